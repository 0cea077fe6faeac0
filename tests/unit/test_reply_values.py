"""Handlers return values, not bytes (issue 10): every command's handler returns its reply
Struct from chatd.protocol.replies, and the reply frame is made from it in one place
(chatd.dispatch). Driven without sockets, through the Dispatcher and the one Driver."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

from chatd.dispatch import Dispatcher, Handler, Outcome, Pending, command_table
from chatd.protocol.replies import REPLIES, reply_type
from chatd.session import Session
from tests.unit.fakes import Core, core, drive


def _spy(handler: Handler, seen: dict[str, list[Any]], name: str) -> Handler:
    """The handler, recording what it returns (plain and async handlers stay so)."""
    if inspect.iscoroutinefunction(handler):

        async def waits(app: Any, req: Any, cmd: Any) -> Any:
            value = await handler(app, req, cmd)
            seen.setdefault(name, []).append(value)
            return value

        return waits

    def plain(app: Any, req: Any, cmd: Any) -> Any:
        value = handler(app, req, cmd)
        seen.setdefault(name, []).append(value)
        return value

    return plain


async def _call(d: Dispatcher, s: Session, frame: dict[str, Any]) -> dict[str, Any]:
    result = d.handle(s, json.dumps(frame).encode())
    if isinstance(result, Pending):
        result = await drive(result)
    assert isinstance(result, Outcome), result
    answer: dict[str, Any] = json.loads(result.reply)
    assert answer["type"] == "ok", (frame, answer)
    return answer["data"]  # type: ignore[no-any-return]


async def test_every_handler_returns_its_commands_reply_struct() -> None:
    seen: dict[str, list[Any]] = {}
    with core() as k:
        k.app.store.open()
        try:
            table = [
                dataclasses.replace(spec, handler=_spy(spec.handler, seen, spec.name))
                for spec in command_table()
            ]
            d = Dispatcher(k.app, table)
            await _run_every_command(k, d)
        finally:
            await k.app.store.close()
    assert set(seen) == set(REPLIES), set(REPLIES) - set(seen)
    wrong = {
        name: sorted({type(v).__name__ for v in values})
        for name, values in seen.items()
        if any(type(v) is not reply_type(name) for v in values)
    }
    assert not wrong, f"handlers that return something else than their reply Struct: {wrong}"


async def _run_every_command(k: Core, d: Dispatcher) -> None:
    root_hash = await k.app.hasher.hash("root-password")
    k.app.accounts.adopt("root", await k.app.store.create_user("Root", root_hash, admin=True))
    a, _ = k.session()
    b, _ = k.session()
    c, _ = k.session()
    g, _ = k.session()
    await _call(d, a, {"cmd": "ping", "id": 1})
    await _call(d, a, {"cmd": "help", "id": 2})
    await _call(d, a, {"cmd": "help", "id": 3, "command": "ping"})
    await _call(d, b, {"cmd": "register", "id": 1, "user": "Bob", "password": "bob-password"})
    await _call(d, b, {"cmd": "login", "id": 2, "user": "Bob", "password": "bob-password"})
    login = await _call(d, a, {"cmd": "login", "id": 4, "user": "Root", "password": "root-password"})
    await _call(d, g, {"cmd": "login", "id": 1, "user": "Guest"})  # a guest: the same reply
    await _call(d, c, {"cmd": "auth", "id": 1, "token": login["token"]})
    await _call(d, a, {"cmd": "whoami", "id": 5})
    await _call(d, a, {"cmd": "refresh", "id": 6})
    await _call(d, a, {"cmd": "room.create", "id": 7, "room": "lobby"})
    await _call(d, a, {"cmd": "room.edit", "id": 8, "room": "lobby", "topic": "hi"})
    await _call(d, a, {"cmd": "room.list", "id": 9})
    await _call(d, a, {"cmd": "room.list", "id": 10, "limit": 1})  # paged: `next`
    await _call(d, b, {"cmd": "room.join", "id": 3, "room": "lobby"})
    await _call(d, a, {"cmd": "room.members", "id": 11, "room": "lobby"})
    sent = await _call(d, a, {"cmd": "msg.send", "id": 12, "room": "lobby", "text": "x", "nonce": "n"})
    await _call(d, a, {"cmd": "msg.send", "id": 13, "room": "lobby", "text": "x", "nonce": "n"})
    await _call(d, a, {"cmd": "msg.send", "id": 14, "to": "Bob", "text": "psst"})
    await _call(d, a, {"cmd": "msg.edit", "id": 15, "message_id": sent["message"]["id"], "text": "y"})
    await _call(d, a, {"cmd": "room.history", "id": 16, "room": "lobby"})
    await _call(d, a, {"cmd": "dm.history", "id": 17, "with": "Bob"})
    await _call(d, a, {"cmd": "sync", "id": 18, "since": 0})
    await _call(d, a, {"cmd": "channels", "id": 19})
    await _call(d, a, {"cmd": "channels", "id": 20, "limit": 1})
    await _call(d, a, {"cmd": "msg.delete", "id": 21, "message_id": sent["message"]["id"]})
    await _call(d, a, {"cmd": "stats", "id": 22})
    await _call(d, a, {"cmd": "user.list", "id": 23})
    await _call(d, b, {"cmd": "room.leave", "id": 4, "room": "lobby"})
    await _call(d, a, {"cmd": "room.delete", "id": 24, "room": "lobby"})
    await _call(d, b, {"cmd": "passwd", "id": 5, "password": "bob-password", "new_password": "bob-password2"})
    await _call(d, a, {"cmd": "user.delete", "id": 25, "user": "Bob"})
    await _call(d, g, {"cmd": "logout", "id": 2})
    await _call(d, a, {"cmd": "logout", "id": 26})
