"""Server frames as bytes, each ending in a newline (wire contract, "Server frames"): the
JSON-lines wire format's encoders, one shared Encoder.

``ok_frame`` and ``error_frame`` make a reply (chatd.dispatch, from the handler's reply
Struct or its error); ``event_frame`` is called by ``Event.json_frame`` alone
(chatd.protocol.events), which keeps the bytes on the event so that one event is encoded
once, however many connections get it.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from chatd.errors import ChatError, RateLimited

RequestId = Union[int, str, None]


class _Ok(msgspec.Struct, tag_field="type", tag="ok"):
    id: RequestId
    data: Any


class _Error(msgspec.Struct, tag_field="type", tag="error", omit_defaults=True):
    id: RequestId
    code: str
    message: str
    retry_after: float | None = None


class _Event(msgspec.Struct, tag_field="type", tag="event"):
    event: str
    data: Any


_encoder = msgspec.json.Encoder()
_encode = _encoder.encode


def encode_json(value: Any) -> bytes:
    return _encode(value)


def ok_frame(request_id: RequestId, data: Any) -> bytes:
    return _encode(_Ok(request_id, data)) + b"\n"


def error_frame(request_id: RequestId, error: ChatError) -> bytes:
    retry = error.retry_after if isinstance(error, RateLimited) else None
    return _encode(_Error(request_id, error.code, error.message, retry)) + b"\n"


def event_frame(event: str, data: Any) -> bytes:
    return _encode(_Event(event, data)) + b"\n"
