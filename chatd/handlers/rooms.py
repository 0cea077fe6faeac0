"""room.* and channels (wire contract, "Commands" and "Rules")."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from chatd.config import Config
from chatd.errors import BadRequest, Forbidden, NotFound
from chatd.protocol import commands as c
from chatd.protocol.frames import event_frame
from chatd.rooms import LiveRoom
from chatd.store.base import RoomRecord

if TYPE_CHECKING:
    from chatd.app import App
    from chatd.dispatch import Request


def check_edit(cmd: c.RoomEdit, config: Config) -> None:
    if cmd.topic is None and cmd.name is None:
        raise BadRequest("room.edit needs `topic` or `name` (or both)")


def _may_manage(req: Request, room: LiveRoom) -> None:
    if not (room.has_user(req.user_key) or req.has("admin")):
        raise Forbidden(f"only members of {room.name} (or an admin) may do that")


async def create(app: App, req: Request, cmd: c.RoomCreate) -> Any:
    app.rooms.reserve(cmd.room)
    try:
        rec = await app.store.create_room(
            RoomRecord(
                0, cmd.room, cmd.topic or "", req.user, app.clock.now(), cmd.ephemeral, cmd.open
            )
        )
    finally:
        app.rooms.release(cmd.room)
    room = app.rooms.add(rec)
    s = req.session
    if s.user_key is not None and not s.closed:
        app.rooms.join(room, s)
    elif room.ephemeral:
        app.leave(room, s, "left")  # nobody in it: an ephemeral room goes at once
    return {"room": room.info()}


async def edit(app: App, req: Request, cmd: c.RoomEdit) -> Any:
    room = app.rooms.get(cmd.room)
    _may_manage(req, room)
    if room.edit_lock is None:
        room.edit_lock = asyncio.Lock()
    async with room.edit_lock:
        return await _edit(app, req, cmd, room)


async def _edit(app: App, req: Request, cmd: c.RoomEdit, room: LiveRoom) -> Any:
    if room.deleted:
        raise NotFound(f"room {cmd.room!r} was deleted")
    new_name = cmd.name if cmd.name is not None else room.name
    topic = cmd.topic if cmd.topic is not None else room.topic
    renamed = new_name != room.name
    case_only = new_name.lower() == room.name.lower()
    if renamed and not case_only:
        app.rooms.reserve(new_name)
    try:
        await app.store.update_room(room.id, new_name, topic)
    finally:
        if renamed and not case_only:
            app.rooms.release(new_name)
    if room.deleted:
        raise NotFound(f"room {cmd.room!r} was deleted")
    previous = room.name
    app.settle(room)  # departures go out under the name they happened under
    room.topic = topic
    if renamed:
        app.rooms.rename(room, new_name)
        info: Any = room.renamed_info(previous)
    else:
        info = room.info()
    req.emit(list(room.sessions), event_frame("room.updated", info))
    return {"room": room.info()}


async def delete(app: App, req: Request, cmd: c.RoomDelete) -> Any:
    room = app.rooms.get(cmd.room)
    _may_manage(req, room)
    await app.store.delete_room(room.id)
    if not room.deleted:
        app.settle(room)
        members = app.rooms.remove(room)
        req.emit(members, event_frame("room.closed", {"room": room.name, "by": req.user}))
    return {}


async def list_(app: App, req: Request, cmd: c.RoomList) -> Any:
    rooms = sorted(app.rooms.rooms.values(), key=lambda r: r.name.lower())
    return {"rooms": [r.info() for r in rooms]}


async def join(app: App, req: Request, cmd: c.RoomJoin) -> Any:
    room = app.rooms.get(cmd.room)
    app.settle(room)  # a newcomer is not told of departures from before it came
    s = req.session
    if app.rooms.join(room, s):
        others = [o for o in room.sessions if o is not s]
        req.emit(others, event_frame("member.joined", {"room": room.name, "user": req.user}))
    return {"room": room.info(), "members": room.members_json()}


async def leave(app: App, req: Request, cmd: c.RoomLeave) -> Any:
    room = app.rooms.get(cmd.room)
    app.leave(room, req.session, "left")
    return {}


async def members(app: App, req: Request, cmd: c.RoomMembers) -> Any:
    room = app.rooms.get(cmd.room)
    app.settle(room)  # departures the list no longer shows are announced first
    return {"room": room.name, "members": room.members_json()}


async def channels(app: App, req: Request, cmd: c.Channels) -> Any:
    now = app.clock.now()
    out: list[dict[str, str]] = [
        {"name": r.name, "type": "room"}
        for r in sorted(app.rooms.rooms.values(), key=lambda r: r.name.lower())
    ]
    names = [u.name for u in app.users.values()]
    names += [g.name for g in app.guests.values() if g.expires_at > now]
    out += [{"name": n, "type": "user"} for n in sorted(set(names), key=str.lower)]
    return {"channels": out}
