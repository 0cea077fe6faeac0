"""The client's sans-I/O frame codec: bytes in -> replies matched by id and typed events;
commands out -> bytes. No sockets, no asyncio, no client state (STYLE: the nats.py fault
is a parser that calls back into the client; this one only reports).

- :meth:`Codec.request` gives a command an id, remembers who waits for its reply (any
  future-like :class:`Waiter`, e.g. an ``asyncio.Future``) and the reply Struct to decode it
  with (``chatd.protocol.replies``), and returns the bytes to write.
- :meth:`Codec.feed` takes bytes as they come (any chunking) and returns the events in
  them, in order; each reply settles its waiter by id (never by position: redis-py#2624),
  with the typed reply or the ``ServerError`` for its code.
- :meth:`Codec.fail` fails every waiter at once (the connection is gone: ``ConnectionLost``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import msgspec

from chatd.protocol import commands as c
from chatd.protocol.framing import TOO_LARGE, LineSplitter
from chatd.protocol.models import Message
from chatd_client.errors import ClientError, ConnectionLost, error_from_wire
from chatd_client.types import Event, Hello

log = logging.getLogger("chatd_client")
T = TypeVar("T")

__all__ = ["Codec", "Waiter", "encode_command"]


class Waiter(Protocol):
    """What waits for a reply: ``asyncio.Future`` is one; unit tests use plain objects."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class _Frame(msgspec.Struct):
    """Any server frame (wire contract, "Server frames"); ``data`` is decoded later, with
    the type the request or the event calls for."""

    type: str
    id: int | str | None = None
    data: msgspec.Raw = msgspec.Raw(b"{}")
    event: str = ""
    code: str = ""
    message: str = ""
    retry_after: float | None = None


class _Pending:
    __slots__ = ("kind", "name", "waiter")

    def __init__(self, waiter: Waiter, kind: Any, name: str) -> None:
        self.waiter = waiter
        self.kind = kind  # the type to decode the reply's data with
        self.name = name  # the command, for messages


_frame_decoder = msgspec.json.Decoder(_Frame)
_any_decoder = msgspec.json.Decoder()
_hello_decoder = msgspec.json.Decoder(Hello)
_message_decoder = msgspec.json.Decoder(Message)
_encoder = msgspec.json.Encoder()


def encode_command(cmd: c.Command, request_id: int) -> bytes:
    """One client frame: flat fields beside ``cmd`` and ``id``, unset optionals omitted."""
    fields = msgspec.to_builtins(cmd)
    fields["id"] = request_id
    return _encoder.encode({k: v for k, v in fields.items() if v is not None}) + b"\n"


def tombstone(data: dict[str, Any]) -> Message:
    """The Message a live ``message.deleted`` stands for (the event has no sender)."""
    return Message(
        id=int(data["id"]),
        rev=int(data["rev"]),
        room=data.get("room"),
        to=data.get("to"),
        from_="",
        deleted=True,
    )


def decode_event(name: str, data: msgspec.Raw) -> Event:
    """A wire event as the client's :class:`Event`; message events carry their Message.
    Raises msgspec.DecodeError, KeyError, TypeError or ValueError when malformed."""
    if name in ("message", "message.edited"):
        msg = _message_decoder.decode(data)
        return Event(name, msgspec.to_builtins(msg), msg.room or None, msg)
    fields: dict[str, Any] = _any_decoder.decode(data)
    if name == "message.deleted":
        msg = tombstone(fields)
        return Event(name, fields, msg.room, msg)
    if name == "room.updated":
        return Event(name, fields, str(fields["name"]))
    room = fields.get("room")
    return Event(name, fields, room if isinstance(room, str) else None)


class Codec:
    """One connection's frames and the requests in flight on it.

    ``feed`` returns :class:`Hello` and :class:`Event` values in the order they arrived;
    replies go to their waiters. A frame that cannot be decoded is logged and skipped
    (parsers report, they do not explode); so is a line longer than ``max_frame``.
    """

    def __init__(self, max_frame: int) -> None:
        self._splitter = LineSplitter(max_frame)
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._failed: Callable[[], ClientError] | None = None

    @property
    def pending(self) -> Mapping[int, object]:
        """Requests in flight by id (to count them; only the codec changes them)."""
        return self._pending

    # --- out ---------------------------------------------------------------------------

    def request(self, cmd: c.Command, kind: type[T], waiter: Waiter) -> tuple[int, bytes]:
        """The id and bytes of ``cmd``; ``waiter`` gets its reply decoded as ``kind``.
        Raises what :meth:`fail` was given once the connection is gone."""
        rid = self._add(waiter, kind, c.command_name(type(cmd)))
        return rid, encode_command(cmd, rid)

    def request_raw(self, name: str, fields: dict[str, Any], waiter: Waiter) -> tuple[int, bytes]:
        """A command this library has no Struct for: the reply is plain JSON values."""
        rid = self._add(waiter, dict[str, Any], name)
        return rid, _encoder.encode({**fields, "cmd": name, "id": rid}) + b"\n"

    def _add(self, waiter: Waiter, kind: Any, name: str) -> int:
        if self._failed is not None:
            raise self._failed()
        rid = next(self._ids)
        self._pending[rid] = _Pending(waiter, kind, name)
        return rid

    def forget(self, rid: int) -> None:
        """The caller stopped waiting (timeout, cancel): a late reply is dropped."""
        self._pending.pop(rid, None)

    # --- in ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Hello | Event]:
        out: list[Hello | Event] = []
        for line in self._splitter.feed(data):
            if line is TOO_LARGE:
                log.warning("skipped a server frame over %d bytes", self._splitter.max_frame)
                continue
            assert isinstance(line, bytes)
            item = self._frame(line)
            if item is not None:
                out.append(item)
        return out

    def _frame(self, line: bytes) -> Hello | Event | None:
        try:
            frame = _frame_decoder.decode(line)
        except msgspec.DecodeError:
            log.warning("ignored an undecodable server frame")
            return None
        if frame.type == "event":
            try:
                if frame.event == "hello":
                    return _hello_decoder.decode(frame.data)
                return decode_event(frame.event, frame.data)
            except (msgspec.DecodeError, KeyError, TypeError, ValueError):
                log.warning("ignored a malformed %r event", frame.event)
                return None
        pending = self._pending.pop(frame.id, None) if isinstance(frame.id, int) else None
        if pending is None or pending.waiter.done():
            if frame.type == "error":
                # id null: frame_too_large, or the server closing us (not logged in in time)
                log.warning("server error %s: %s", frame.code, frame.message)
            return None
        self._settle(pending, frame)
        return None

    @staticmethod
    def _settle(pending: _Pending, frame: _Frame) -> None:
        if frame.type == "error":
            pending.waiter.set_exception(
                error_from_wire(frame.code, frame.message, frame.retry_after)
            )
            return
        try:
            value = msgspec.json.decode(frame.data, type=pending.kind)
        except msgspec.DecodeError as exc:  # ValidationError too: a reply of another shape
            pending.waiter.set_exception(exc)
        else:
            pending.waiter.set_result(value)

    # --- the end -----------------------------------------------------------------------

    def fail(
        self, error: Callable[[], ClientError] = lambda: ConnectionLost("connection lost")
    ) -> None:
        """The connection is gone: every waiter fails at once with a fresh ``error()``,
        and so does every later :meth:`request`."""
        if self._failed is None:
            self._failed = error
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.waiter.done():
                p.waiter.set_exception(error())
