"""The command table and the Dispatcher, driven with plain calls (STYLE 1, 2, 3)."""

from __future__ import annotations

import asyncio
import json
import logging
import typing
from typing import Any

import pytest

from chatd.bus import ToSessions
from chatd.dispatch import Dispatcher, Outcome, Pending, Request, Spec, Throttle, command_table
from chatd.errors import NotFound
from chatd.protocol import commands as c
from chatd.protocol.commands import ALL_COMMANDS, AnyCommand, command_name
from chatd.protocol.events import ServerShutdown
from chatd.session import Session
from tests.unit.fakes import UNIT_CONFIG, Core, core, drive


def reply(result: object) -> dict[str, Any]:
    assert isinstance(result, Outcome), result
    frame: dict[str, Any] = json.loads(result.reply)
    assert result.reply.endswith(b"\n") and result.reply.count(b"\n") == 1
    return frame


def run(k: Core, s: Session, frame: dict[str, Any] | bytes) -> dict[str, Any]:
    line = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
    return reply(k.dispatcher.handle(s, line))


# --- the table -----------------------------------------------------------------------


def test_union_tags_equal_the_command_table() -> None:
    table = command_table()
    names = [spec.name for spec in table]
    assert len(names) == len(set(names)), "a command is in the table twice"
    assert set(names) == {command_name(cls) for cls in ALL_COMMANDS}
    assert set(typing.get_args(AnyCommand)) == set(ALL_COMMANDS)
    assert len(typing.get_args(AnyCommand)) == len(ALL_COMMANDS)
    assert {spec.command for spec in table} == set(ALL_COMMANDS)
    for spec in table:
        assert spec.command.__struct_config__.tag == spec.name


def test_contract_commands_are_all_there() -> None:
    expected = {
        "ping", "help", "register", "login", "auth", "refresh", "logout", "whoami",
        "room.create", "room.edit", "room.delete", "room.list", "room.join", "room.leave",
        "room.members", "room.history", "msg.send", "msg.edit", "msg.delete", "dm.history",
        "sync", "channels", "user.delete", "passwd", "user.list", "stats",
    }  # fmt: skip
    assert {spec.name for spec in command_table()} == expected


def test_only_the_contract_commands_skip_the_token() -> None:
    open_ = {spec.name for spec in command_table() if not spec.auth}
    assert open_ == {"register", "login", "auth", "ping", "help"}


def test_help_lists_every_command_with_its_usage() -> None:
    with core() as k:
        s, _ = k.session()
        frame = run(k, s, {"cmd": "help", "id": "h"})
    assert frame["type"] == "ok" and frame["id"] == "h"
    listed = frame["data"]["commands"]
    assert [e["cmd"] for e in listed] == [spec.name for spec in command_table()]
    for entry in listed:
        assert entry["usage"].startswith(entry["cmd"]), entry
        assert isinstance(entry["auth"], bool)


# --- replies and errors --------------------------------------------------------------


def test_ping_answers_pong_with_the_id_echoed() -> None:
    with core() as k:
        s, peer = k.session()
        assert run(k, s, {"cmd": "ping", "id": 1}) == {"type": "ok", "id": 1, "data": {"pong": True}}
        assert run(k, s, {"cmd": "ping"}) == {"type": "ok", "id": None, "data": {"pong": True}}
        assert peer.sent == []  # the dispatcher returns frames, it never sends replies


@pytest.mark.parametrize(
    ("line", "code", "rid"),
    [
        (b"not json", "bad_frame", None),
        (b"[1]", "bad_frame", None),
        (b'{"id":4}', "bad_request", 4),
        (b'{"cmd":"nope","id":5}', "unknown_command", 5),
        (b'{"cmd":"room.join","id":6}', "bad_request", 6),
    ],
)
def test_bad_frames_become_error_frames(line: bytes, code: str, rid: object) -> None:
    with core() as k:
        s, _ = k.session()
        frame = run(k, s, line)
    assert frame["type"] == "error" and frame["code"] == code and frame["id"] == rid
    assert frame["message"] and "retry_after" not in frame


def test_a_command_that_needs_a_token_without_one_is_unauthorized() -> None:
    with core() as k:
        s, _ = k.session()
        frame = run(k, s, {"cmd": "room.list", "id": "x"})
    assert frame["code"] == "unauthorized" and frame["id"] == "x"


def test_fields_are_checked_before_the_token() -> None:
    with core() as k:
        s, _ = k.session()
        # room.edit without topic or name: a check of the table, before auth.
        assert run(k, s, {"cmd": "room.edit", "id": 1, "room": "a"})["code"] == "bad_request"
        assert run(k, s, {"cmd": "sync", "id": 2, "since": 0, "limit": 0})["code"] == "bad_request"
        frame = run(k, s, {"cmd": "msg.send", "id": 3, "room": "a", "to": "b", "text": "x"})
        assert frame["code"] == "bad_request"
        assert run(k, s, {"cmd": "msg.send", "id": 4, "room": "a", "text": "  "})["code"] == "bad_request"
        assert run(k, s, {"cmd": "room.list", "id": 5, "token": "junk"})["code"] == "unauthorized"


def test_bad_and_expired_tokens() -> None:
    with core() as k:
        ann = k.add_user("Ann", 1)
        token = k.token(ann)
        s, _ = k.session()
        assert run(k, s, {"cmd": "whoami", "token": token[:-3] + "AAA"})["code"] == "unauthorized"
        k.clock.advance(3600)
        assert run(k, s, {"cmd": "whoami", "token": token})["code"] == "token_expired"
        assert s.user is None


def test_first_valid_token_binds_the_connection() -> None:
    with core() as k:
        ann = k.add_user("Ann", 1)
        bob = k.add_user("bob", 2)
        s, _ = k.session()
        frame = run(k, s, {"cmd": "whoami", "id": 1, "token": k.token(ann, ("msg:edit",))})
        assert frame["data"]["user"] == "Ann" and frame["data"]["grants"] == ["msg:edit"]
        assert s.user == "Ann" and s.user_key == "ann"
        # Bound: no token field needed any more.
        assert run(k, s, {"cmd": "whoami"})["data"]["user"] == "Ann"
        # Another user's token on a bound connection is forbidden.
        frame = run(k, s, {"cmd": "whoami", "id": 2, "token": k.token(bob)})
        assert frame["code"] == "forbidden" and frame["id"] == 2
        assert s.user == "Ann"


def test_a_missing_grant_is_forbidden() -> None:
    with core() as k:
        ann = k.add_user("Ann", 1)
        s, _ = k.session()
        frame = run(k, s, {"cmd": "user.delete", "id": 1, "user": "bob", "token": k.token(ann)})
        assert frame["code"] == "forbidden" and "admin" in frame["message"]


async def test_a_deleted_account_token_is_unauthorized() -> None:
    with core() as k:
        k.app.store.open()
        try:
            ann = k.add_user("Ann", 1)
            token = k.token(ann)
            k.app.accounts.forget_user("ann")
            s, _ = k.session()
            # An account not in memory is looked for in the store first (it may have been
            # added by `chatd user add` a moment ago); it is not there either.
            pending = k.dispatcher.handle(s, json.dumps({"cmd": "whoami", "token": token}).encode())
            assert isinstance(pending, Pending)
            assert reply(await drive(pending))["code"] == "unauthorized"
            # Same name, new account: the old token does not work, and no read is needed.
            k.add_user("Ann", 7)
            assert run(k, s, {"cmd": "whoami", "token": token})["code"] == "unauthorized"
        finally:
            await k.app.store.close()


def test_session_expiry_timer_unbinds_and_tells_the_client() -> None:
    with core() as k:
        ann = k.add_user("Ann", 1)
        s, peer = k.session()
        run(k, s, {"cmd": "whoami", "token": k.token(ann, ttl=600)})
        # One timer at a time: the notice first, which then sets the one for the expiry.
        [expiring] = k.scheduler.live()
        assert expiring.delay == 540
        k.clock.advance(540)
        expiring.fire()
        assert peer.frames() == [
            {"type": "event", "event": "session.expiring", "data": {"expires_at": s.claims.exp}}  # type: ignore[union-attr]
        ]
        [expired] = k.scheduler.live()
        assert expired.delay == 60
        k.clock.advance(60)
        expired.fire()
        assert peer.frames() == [{"type": "event", "event": "session.expired", "data": {}}]
        assert s.user is None and s.claims is None and not k.app.presence.is_online("ann")
        assert run(k, s, {"cmd": "whoami"})["code"] == "unauthorized"


def test_closing_a_session_cancels_its_timers() -> None:
    with core() as k:
        ann = k.add_user("Ann", 1)
        s, _ = k.session()
        run(k, s, {"cmd": "whoami", "token": k.token(ann)})
        assert len(k.scheduler.live()) == 1
        k.app.close_session(s)
        assert k.scheduler.live() == [] and s not in k.app.presence.sessions()


def test_metered_commands_are_throttled_but_ping_is_not() -> None:
    config = UNIT_CONFIG.replace(command_rate=2.0, command_burst=3)
    with core(config) as k:
        s, _ = k.session()
        for _ in range(3):
            assert run(k, s, {"cmd": "help"})["type"] == "ok"
        result = k.dispatcher.handle(s, b'{"cmd":"help"}')
        assert isinstance(result, Throttle) and result.delay == pytest.approx(0.5)
        for _ in range(50):
            assert run(k, s, {"cmd": "ping"})["type"] == "ok"
        k.clock.advance(0.5)
        assert run(k, s, {"cmd": "help"})["type"] == "ok"


def test_command_rate_zero_turns_metering_off() -> None:
    with core(UNIT_CONFIG.replace(command_rate=0.0)) as k:
        s, _ = k.session()
        assert s.commands is None
        for _ in range(1000):
            assert run(k, s, {"cmd": "help"})["type"] == "ok"


# --- handlers of a custom table ------------------------------------------------------


async def _boom(app: Any, req: Request, cmd: Any) -> Any:
    raise RuntimeError("secret detail")


async def _missing(app: Any, req: Request, cmd: Any) -> Any:
    raise NotFound("no such thing")


def test_an_unexpected_exception_is_internal_without_detail(caplog: pytest.LogCaptureFixture) -> None:
    with core() as k:
        d = Dispatcher(k.app, [Spec(c.Ping, _boom, "ping", auth=False)])
        s, _ = k.session()
        with caplog.at_level(logging.ERROR, logger="chatd"):
            frame = reply(d.handle(s, b'{"cmd":"ping","id":1}'))
        assert frame["code"] == "internal" and frame["id"] == 1
        assert "secret" not in frame["message"]
        assert "secret detail" in caplog.text  # logged with the traceback


def test_a_chat_error_from_a_handler_becomes_its_code() -> None:
    with core() as k:
        d = Dispatcher(k.app, [Spec(c.Ping, _missing, "ping", auth=False)])
        s, _ = k.session()
        frame = reply(d.handle(s, b'{"cmd":"ping","id":"q"}'))
        assert frame == {"type": "error", "id": "q", "code": "not_found", "message": "no such thing"}


EVENT = ServerShutdown(reason="test")


async def test_a_handler_that_waits_comes_back_pending_with_its_events() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[str] = loop.create_future()
    # Each handler its own future: started with send(None) outside a Task, a second
    # awaiter of one pending Future would raise "await wasn't used with future".
    gate2: asyncio.Future[str] = loop.create_future()

    async def waits(app: Any, req: Request, cmd: Any) -> Any:
        value = await gate
        req.emit(ToSessions(), EVENT)
        return {"got": value}

    async def waits_then_fails(app: Any, req: Request, cmd: Any) -> Any:
        await gate2
        raise RuntimeError("late")

    with core() as k:
        d = Dispatcher(
            k.app,
            [
                Spec(c.Ping, waits, "ping", auth=False, overlap=True),
                Spec(c.Help, waits_then_fails, "help", auth=False),
            ],
        )
        s, _ = k.session()
        first = d.handle(s, b'{"cmd":"ping","id":1}')
        second = d.handle(s, b'{"cmd":"help","id":2}')
        assert isinstance(first, Pending) and first.overlap
        assert isinstance(second, Pending) and not second.overlap
        gate.set_result("yes")
        gate2.set_result("no")
        done = await drive(first)
        assert reply(done) == {"type": "ok", "id": 1, "data": {"got": "yes"}}
        assert [f for _, f in done.events or ()] == [EVENT]
        failed = await drive(second)
        assert reply(failed)["code"] == "internal"
