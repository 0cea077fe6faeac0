"""The client's one exception tree; server errors are mapped from their wire code in one
table (wire contract, "Server frames"; the redis-py lesson).

    ClientError                        base
    ├── ConnectionLost                 the connection dropped with the request in flight,
    │   │                              or there is no connection right now
    │   └── ClientClosed               the client is closed: nothing will be sent any more
    │       └── SessionEnded           the server refused the client's token (revoked, account
    │                                  deleted, guest session ended, expired beyond refresh);
    │                                  the client closed itself rather than log in as anyone
    │                                  else. ``.code``/``.message`` are the server's refusal
    ├── RequestTimeout                 no reply within the request's timeout
    └── ServerError                    an ``error`` frame; ``.code`` is its wire code
        ├── BadFrame          bad_frame
        ├── BadRequest        bad_request
        ├── UnknownCommand    unknown_command
        ├── Unauthorized      unauthorized
        ├── TokenExpired      token_expired
        ├── Forbidden         forbidden
        ├── NotFound          not_found
        ├── Conflict          conflict
        ├── RateLimited       rate_limited (``.retry_after`` seconds)
        ├── FrameTooLarge     frame_too_large
        └── Internal          internal
A code this client does not know yet becomes a plain ``ServerError`` with that code.

``ClientClosed`` is a ``ConnectionLost``: a request that was in flight when the client closed
did lose its connection, and ``except ConnectionLost`` around a call sees it too. Catch
``ClientClosed`` first to tell "closed for good" from "try again after the reconnect".
"""

from __future__ import annotations

from typing import ClassVar


class ClientError(Exception):
    """Base of every exception raised by chatd_client."""


class ConnectionLost(ClientError):
    """The connection dropped before the reply came (or there was none to send on)."""


class RequestTimeout(ClientError):
    """No reply within the timeout. The request may still have been executed."""


class ClientClosed(ConnectionLost):
    """The client is closed (by the application, or by itself: see ``SessionEnded``)."""


class SessionEnded(ClientClosed):
    """The server refused this client's token and no password can prove the same identity
    again (token revoked, account deleted, guest session ended, expired beyond refresh).
    The client closed itself instead of logging in under another identity (a guest of the
    same name): every call, and the event iterator once drained, raise this.
    ``code`` is the refusal's wire code (``unauthorized`` or ``token_expired``)."""

    def __init__(self, message: str, *, code: str = "unauthorized") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class ServerError(ClientError):
    """The server answered with an ``error`` frame."""

    code: ClassVar[str] = "internal"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None and code != type(self).code:
            self.code = code  # type: ignore[misc]  # an unknown code on the base class
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class BadFrame(ServerError):
    code = "bad_frame"


class BadRequest(ServerError):
    code = "bad_request"


class UnknownCommand(ServerError):
    code = "unknown_command"


class Unauthorized(ServerError):
    code = "unauthorized"


class TokenExpired(ServerError):
    code = "token_expired"


class Forbidden(ServerError):
    code = "forbidden"


class NotFound(ServerError):
    code = "not_found"


class Conflict(ServerError):
    code = "conflict"


class RateLimited(ServerError):
    code = "rate_limited"


class FrameTooLarge(ServerError):
    code = "frame_too_large"


class Internal(ServerError):
    code = "internal"


# The one table: wire code -> exception class.
ERRORS: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (
        BadFrame,
        BadRequest,
        UnknownCommand,
        Unauthorized,
        TokenExpired,
        Forbidden,
        NotFound,
        Conflict,
        RateLimited,
        FrameTooLarge,
        Internal,
    )
}


def error_from_wire(code: str, message: str, retry_after: float | None = None) -> ServerError:
    """The exception for an ``error`` frame."""
    cls = ERRORS.get(code, ServerError)
    return cls(message, code=code, retry_after=retry_after)
