"""The client's frame codec, driven without sockets or an event loop: bytes in, replies
settled by id, events out, every pending request failed at once when the connection goes."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from chatd_client.codec import Codec, encode_command
from chatd_client.errors import ConnectionLost, NotFound, RateLimited
from chatd_client.types import Event, Hello

from chatd.protocol import commands as c
from chatd.protocol.replies import AuthReply, PingReply, RoomMembersReply


class Waiter:
    """A future-like without a loop: records what the codec settles it with."""

    def __init__(self) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        assert not self._done, "settled twice"
        self.result, self._done = result, True

    def set_exception(self, exception: BaseException) -> None:
        assert not self._done, "settled twice"
        self.error, self._done = exception, True


def line(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame, ensure_ascii=False).encode() + b"\n"


def ok(rid: int, data: dict[str, Any]) -> bytes:
    return line({"type": "ok", "id": rid, "data": data})


MSG = {
    "id": 3, "rev": 9, "room": "lobby", "to": None, "from": "ann", "text": "héllo",
    "ts": "2026-12-01T08:33:41.963Z", "edited_ts": None, "edited_by": None, "deleted": False,
}  # fmt: skip
WHO = {"user": "ann", "grants": ["msg:edit"], "expires_at": 99}


def test_a_command_encodes_flat_with_its_id_and_without_unset_fields() -> None:
    frame = json.loads(encode_command(c.MsgSend(text="hi", room="lobby"), 7))
    assert frame == {"cmd": "msg.send", "id": 7, "text": "hi", "room": "lobby"}
    codec = Codec(1 << 16)
    rid, data = codec.request(c.DmHistory(with_="bob", limit=5), dict, Waiter())
    assert json.loads(data) == {"cmd": "dm.history", "id": rid, "with": "bob", "limit": 5}
    assert data.endswith(b"\n") and data.count(b"\n") == 1


def test_out_of_order_replies_are_matched_by_id_and_typed() -> None:
    codec = Codec(1 << 16)
    ping, who, members = Waiter(), Waiter(), Waiter()
    r1, _ = codec.request(c.Ping(), PingReply, ping)
    r2, _ = codec.request(c.WhoAmI(), AuthReply, who)
    r3, _ = codec.request(c.RoomMembers(room="lobby"), RoomMembersReply, members)
    assert len(codec.pending) == 3
    out = codec.feed(ok(r3, {"room": "lobby", "members": ["ann"]}) + ok(r1, {"pong": True}))
    assert out == []
    assert members.result == RoomMembersReply(room="lobby", members=["ann"])
    assert ping.result == PingReply(pong=True)
    assert not who.done()
    codec.feed(ok(r2, WHO))
    assert who.result == AuthReply(user="ann", grants=["msg:edit"], expires_at=99)
    assert codec.pending == {}


def test_an_event_between_replies_comes_out_in_order_and_replies_still_settle() -> None:
    codec = Codec(1 << 16)
    a, b = Waiter(), Waiter()
    r1, _ = codec.request(c.Ping(), PingReply, a)
    r2, _ = codec.request(c.Ping(), PingReply, b)
    chunk = (
        ok(r1, {"pong": True})
        + line({"type": "event", "event": "message", "data": MSG})
        + line({"type": "event", "event": "member.joined", "data": {"room": "x", "user": "b"}})
        + ok(r2, {"pong": True})
    )
    out = codec.feed(chunk)
    assert [e.name for e in out if isinstance(e, Event)] == ["message", "member.joined"]
    first = out[0]
    assert isinstance(first, Event) and first.message is not None
    assert first.message.text == "héllo" and first.message.from_ == "ann" and first.room == "lobby"
    assert out[1].room == "x"  # type: ignore[union-attr]
    assert a.done() and b.done()


def test_a_line_split_across_chunks_settles_only_when_complete() -> None:
    codec = Codec(1 << 16)
    w = Waiter()
    rid, _ = codec.request(c.RoomMembers(room="lobby"), RoomMembersReply, w)
    data = ok(rid, {"room": "lobby", "members": ["zoë"]})
    cut = data.index("ë".encode()) + 1  # in the middle of a two-byte character
    for part in (data[:5], data[5:cut], data[cut:-1]):
        assert codec.feed(part) == []
        assert not w.done()
    codec.feed(data[-1:])
    assert w.result == RoomMembersReply(room="lobby", members=["zoë"])


def test_error_replies_raise_the_class_for_their_code() -> None:
    codec = Codec(1 << 16)
    missing, limited = Waiter(), Waiter()
    r1, _ = codec.request(c.RoomJoin(room="nowhere"), dict, missing)
    r2, _ = codec.request(c.MsgSend(text="x", room="a"), dict, limited)
    codec.feed(
        line(
            {
                "type": "error",
                "id": r2,
                "code": "rate_limited",
                "message": "slow",
                "retry_after": 0.5,
            }
        )
        + line({"type": "error", "id": r1, "code": "not_found", "message": "no room"})
    )
    assert isinstance(missing.error, NotFound) and missing.error.message == "no room"
    assert isinstance(limited.error, RateLimited) and limited.error.retry_after == 0.5


def test_a_disconnect_fails_every_pending_request_at_once() -> None:
    codec = Codec(1 << 16)
    waiters = [Waiter() for _ in range(5)]
    for w in waiters:
        codec.request(c.Ping(), PingReply, w)
    codec.fail(lambda: ConnectionLost("connection reset"))
    assert all(isinstance(w.error, ConnectionLost) for w in waiters)
    assert len({id(w.error) for w in waiters}) == 5  # a fresh exception each
    assert codec.pending == {}
    with pytest.raises(ConnectionLost):
        codec.request(c.Ping(), PingReply, Waiter())


def test_hello_bad_lines_and_unknown_ids_are_reported_not_raised() -> None:
    codec = Codec(64)
    w = Waiter()
    rid, _ = codec.request(c.Ping(), PingReply, w)
    hello = {
        "server": "chatd", "version": "1", "protocol": 1, "max_frame": 65536, "max_text": 4000,
        "history_limit": 500, "epoch": "e", "rev": 4, "new_field": True,
    }  # fmt: skip
    out = codec.feed(
        b"not json\n"
        + b"x" * 100
        + b"\n"  # over max_frame: skipped whole
        + line({"type": "ok", "id": 999, "data": {}})  # nobody waits for it
        + line({"type": "event", "event": "message", "data": {"id": "bad"}})
        + ok(rid, {"pong": True})
    )
    assert out == [] and w.result == PingReply(pong=True)
    big = Codec(1 << 16)
    out = big.feed(line({"type": "event", "event": "hello", "data": hello}))
    assert out == [Hello("chatd", "1", 1, 65536, 4000, 500, "e", 4)]


def test_a_forgotten_request_drops_its_late_reply() -> None:
    codec = Codec(1 << 16)
    w = Waiter()
    rid, _ = codec.request(c.Ping(), PingReply, w)
    codec.forget(rid)
    assert codec.feed(ok(rid, {"pong": True})) == []
    assert not w.done()


def test_a_live_deletion_is_a_tombstone() -> None:
    codec = Codec(1 << 16)
    data = {"id": 3, "rev": 10, "room": "lobby", "to": None, "by": "ann"}
    (ev,) = codec.feed(line({"type": "event", "event": "message.deleted", "data": data}))
    assert isinstance(ev, Event) and ev.message is not None
    assert ev.message.deleted and ev.message.rev == 10 and ev.room == "lobby"


@pytest.mark.parametrize("module", ["codec", "recovery"])
def test_the_codec_and_the_recovery_are_sans_io(module: str) -> None:
    """They import no I/O and nothing of the client object: only the wire types, the
    errors and the event type (the nats.py fault is a parser that calls into the client)."""
    path = Path(__file__).resolve().parents[2] / "clients" / "chatd_client" / f"{module}.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    io = {"asyncio", "socket", "ssl", "selectors", "chatd_client.client", "chatd_client.events"}
    assert not imported & io, imported & io
    assert {m for m in imported if m.startswith("chatd_client")} <= {
        "chatd_client.codec", "chatd_client.errors", "chatd_client.types",
    }  # fmt: skip
