"""TLS for `chatd serve --tls-cert FILE --tls-key FILE` (stdlib ssl, TLS 1.2 or later)."""

from __future__ import annotations

import ssl


class TLSSetupError(Exception):
    """The certificate or key cannot be used; the message says which and why."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for `cert` (PEM, chain allowed) and its `key`, TLS 1.2 or later,
    with the stdlib's default ciphers. Raises TLSSetupError with one clear line for a
    missing, unreadable, malformed or mismatched file."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TLSSetupError(f"TLS: no such file: {exc.filename}") from None
    except PermissionError as exc:
        raise TLSSetupError(f"TLS: cannot read {exc.filename}: permission denied") from None
    except IsADirectoryError as exc:
        raise TLSSetupError(f"TLS: {exc.filename} is a directory") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            why = "the key does not belong to the certificate"
        else:
            why = "not a PEM certificate and matching private key"
        raise TLSSetupError(f"TLS: cannot use {cert} with {key}: {why} ({exc.reason})") from None
    except OSError as exc:
        raise TLSSetupError(f"TLS: cannot read {cert} or {key}: {exc.strerror or exc}") from None
    return ctx


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the server (TLS 1.2+): against the CA certificates in
    `cafile` (e.g. a self-signed server certificate), else the system's. Raises
    TLSSetupError when `cafile` cannot be used."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile is not None:
        try:
            ctx.load_verify_locations(cafile=cafile)
        except FileNotFoundError:
            raise TLSSetupError(f"TLS: no such file: {cafile}") from None
        except (ssl.SSLError, OSError) as exc:
            raise TLSSetupError(f"TLS: cannot use {cafile} as CA certificates: {exc}") from None
    return ctx
