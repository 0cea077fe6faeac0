"""The one exception tree of chatd; each class carries its wire error code.

    ChatError                      base, never raised itself
    ├── BadFrame          bad_frame         not JSON, not UTF-8, not an object
    ├── BadRequest        bad_request       missing/mistyped/invalid field
    ├── UnknownCommand    unknown_command   no such `cmd`
    ├── Unauthorized      unauthorized      no/invalid/revoked token, bad credentials
    ├── TokenExpired      token_expired     a token past its `exp`
    ├── Forbidden         forbidden         missing grant, not allowed
    ├── NotFound          not_found         unknown room, user or message
    ├── Conflict          conflict          name taken
    ├── RateLimited       rate_limited      carries `retry_after` seconds
    ├── FrameTooLarge     frame_too_large   a line over max_frame
    └── Internal          internal          storage failure with a safe message

Only the dispatcher turns these into error frames (wire contract, "Server frames");
any other exception becomes `internal` with no detail sent to the client.
"""

from __future__ import annotations


class ChatError(Exception):
    """A failure that maps to one wire error code."""

    code = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message or self.code.replace("_", " ")


class BadFrame(ChatError):
    code = "bad_frame"


class BadRequest(ChatError):
    code = "bad_request"


class UnknownCommand(ChatError):
    code = "unknown_command"


class Unauthorized(ChatError):
    code = "unauthorized"


class TokenExpired(ChatError):
    code = "token_expired"


class Forbidden(ChatError):
    code = "forbidden"


class NotFound(ChatError):
    code = "not_found"


class Conflict(ChatError):
    code = "conflict"


class FrameTooLarge(ChatError):
    code = "frame_too_large"


class Internal(ChatError):
    code = "internal"


class StorageFailed(Internal):
    """The store can no longer be used safely: the server is stopping (and says why once;
    whatever meets this error meanwhile has nothing to add)."""


class StoreStopped(Internal):
    """A write queued after the server began to stop: it is not stored. Nothing is lost
    that was acknowledged; an ephemeral room it would have deleted is dropped at start."""


class RateLimited(ChatError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        # Rounded up to milliseconds so a client that waits exactly this long succeeds.
        self.retry_after = max(0.001, round(retry_after + 0.0005, 3))
