"""Self-signed certificates for the TLS tests, made with the openssl binary (skipped, with
the reason, where it is missing; .ci/run installs it so CI never skips)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from chatd.tls import client_context

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl binary is not installed")


class Certs:
    def __init__(self, root: Path) -> None:
        self.cert = str(root / "cert.pem")
        self.key = str(root / "key.pem")
        self.other_key = str(root / "other-key.pem")  # belongs to no certificate here
        self.garbage = str(root / "garbage.pem")

    def client(self) -> ssl.SSLContext:
        """A client context that trusts this self-signed certificate (and verifies it)."""
        return client_context(self.cert)


def make_certs(root: Path) -> Certs:
    """A self-signed P-256 certificate for 127.0.0.1 and localhost, and a stray key."""
    assert OPENSSL is not None
    certs = Certs(root)
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", certs.key, "-out", certs.cert, "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    subprocess.run(
        [OPENSSL, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-out", certs.other_key],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    Path(certs.garbage).write_text("not a certificate\n")
    return certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if OPENSSL is None:
        pytest.skip("the openssl binary is not installed")
    return make_certs(tmp_path_factory.mktemp("tls"))
