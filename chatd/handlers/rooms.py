"""room.* and channels (wire contract, "Commands" and "Rules")."""

from __future__ import annotations

import asyncio
import bisect
from typing import TYPE_CHECKING, cast

import msgspec

from chatd.bus import ToRoom, ToSessions
from chatd.config import Config
from chatd.errors import BadRequest, Forbidden, NotFound
from chatd.protocol import commands as c
from chatd.protocol.events import MemberJoined, RoomClosed, RoomUpdated
from chatd.protocol.frames import encode_json
from chatd.protocol.models import RoomInfo
from chatd.protocol.replies import (
    EMPTY,
    Channel,
    ChannelsReply,
    Empty,
    RoomJoinReply,
    RoomListReply,
    RoomMembersReply,
    RoomReply,
)
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


def check_list(cmd: c.RoomList | c.Channels, config: Config) -> None:
    if cmd.limit is not None and cmd.limit <= 0:
        raise BadRequest("limit must be at least 1")
    if isinstance(cmd, c.Channels) and cmd.after is not None:
        _channel_cursor(cmd.after)


def _channel_cursor(after: str) -> tuple[str, str]:
    """("room"|"user", case-folded name) from a channels cursor. Raises BadRequest."""
    kind, _, name = after.partition(":")
    if kind not in ("room", "user") or not c.is_valid_name(name):
        raise BadRequest(
            "after must be the `next` of an earlier channels reply: room:NAME or user:NAME"
        )
    return kind, name.lower()


def _check_room_cap(app: App, req: Request) -> None:
    """--max-rooms-per-user: rooms a user owns at once, ephemeral ones too while they
    last (issue 13, item 5). `forbidden`, not `rate_limited`: waiting does not help,
    deleting a room does. Admins are exempt."""
    cap = app.config.max_rooms_per_user
    if cap <= 0 or req.has("admin"):
        return
    owned = app.rooms.owned(req.user)
    if owned >= cap:
        raise Forbidden(
            f"you own {owned} rooms and this server allows {cap}; delete one first"
        )


async def create(app: App, req: Request, cmd: c.RoomCreate) -> RoomReply:
    _check_room_cap(app, req)
    app.rooms.reserve(cmd.room, req.user)
    try:
        rec = await app.store.create_room(
            RoomRecord(
                0, cmd.room, cmd.topic or "", req.user, app.clock.now(), cmd.ephemeral, cmd.open
            )
        )
    finally:
        app.rooms.release(cmd.room, req.user)
    room = app.rooms.add(rec)
    s = req.session
    if s.user_key is not None and not s.closed:
        app.rooms.join(room, s)
        if (entering := app.bus.entered(room, s)) is not None:
            # Several nodes: a join elsewhere right after this sees the creator.
            if (seen := await entering) is not None:
                return RoomReply(room=seen[0])
    elif room.ephemeral:
        app.leave(room, s, "left")  # nobody in it: an ephemeral room goes at once
    return RoomReply(room=room.info())


async def edit(app: App, req: Request, cmd: c.RoomEdit) -> RoomReply:
    room = app.rooms.get(cmd.room)
    _may_manage(req, room)
    if room.edit_lock is None:
        room.edit_lock = asyncio.Lock()
    async with room.edit_lock:
        return await _edit(app, req, cmd, room)


async def _edit(app: App, req: Request, cmd: c.RoomEdit, room: LiveRoom) -> RoomReply:
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
        info: RoomInfo = room.renamed_info(previous)
    else:
        info = room.info()
    req.emit(ToRoom(room), RoomUpdated(info))
    return RoomReply(room=room.info())


async def delete(app: App, req: Request, cmd: c.RoomDelete) -> Empty:
    room = app.rooms.get(cmd.room)
    _may_manage(req, room)
    await app.store.delete_room(room.id, req.user)
    if not room.deleted:
        app.settle(room)
        members = app.rooms.remove(room)
        # The members it had: it has none now.
        req.emit(ToSessions.of(members), RoomClosed(room=room.name, by=req.user))
    return EMPTY


def _list_limit(app: App, asked: int | None) -> int:
    return min(asked or app.config.list_limit, app.config.list_limit)


class _Page:
    """Entries encoded once, up to `limit` of them and within the reply byte budget (as
    history pages, protocol.md Limits): a reply never trips the outbox hard limit. The
    reply Struct holds them as they are (``msgspec.Raw``; chatd.protocol.replies)."""

    def __init__(self, app: App, limit: int) -> None:
        self.items: list[msgspec.Raw] = []
        self._left = limit
        # The envelope around the entries: an escaped 128-character id, `more`, `next`.
        self._budget = app.config.history_page_bytes - 1024
        self.full = False

    def add(self, item: object) -> bool:
        """Add one entry; False (and nothing added) when the page is full."""
        if self._left <= 0:
            self.full = True
            return False
        raw = encode_json(item)
        if len(raw) + 1 > self._budget:
            self.full = True
            return False
        self._budget -= len(raw) + 1
        self._left -= 1
        self.items.append(msgspec.Raw(raw))
        return True


async def list_(app: App, req: Request, cmd: c.RoomList) -> RoomListReply:
    """Rooms in case-insensitive name order, a page at a time: `after` a name, `limit`.
    [chatd] `more` says whether rooms follow; then `next` is the cursor to pass as
    `after`. Without paging fields a small server's reply is every room."""
    await app.caught_up()
    page = _Page(app, _list_limit(app, cmd.limit))
    _, rooms, start = app.rooms.after(cmd.after)
    last = None
    for room in rooms[start:]:
        if not page.add(room.info()):
            break
        last = room.name
    rooms_page = cast("list[RoomInfo]", page.items)  # each encoded once, spliced in as is
    if page.full:
        return RoomListReply(rooms=rooms_page, more=True, next=last or cmd.after)
    return RoomListReply(rooms=rooms_page, more=False)


async def join(app: App, req: Request, cmd: c.RoomJoin) -> RoomJoinReply:
    await app.caught_up()  # several nodes: members and rooms as every node has changed them
    room = app.rooms.get(cmd.room)
    app.settle(room)  # a newcomer is not told of departures from before it came
    s = req.session
    if app.rooms.join(room, s):
        req.emit(ToRoom(room, skip=s), MemberJoined(room=room.name, user=req.user))
    if (entering := app.bus.entered(room, s)) is not None:
        # Several nodes: recorded in Redis, which announces it if the user is new to the
        # room on every node (NotFound: the room closed first, as one server would say);
        # the answer is the room as of that entry, where this connection's events start.
        if (seen := await entering) is not None:
            info, members = seen
            return RoomJoinReply(room=info, members=cast("list[str]", members))
    return RoomJoinReply(room=room.info(), members=_members(room))


async def leave(app: App, req: Request, cmd: c.RoomLeave) -> Empty:
    await app.caught_up()  # several nodes: member.left only if no other node has the user there
    room = app.rooms.get(cmd.room)
    app.leave(room, req.session, "left")
    if (written := app.bus.published()) is not None:
        await written  # several nodes: an emptied room is closed before the reply
    return EMPTY


async def members(app: App, req: Request, cmd: c.RoomMembers) -> RoomMembersReply:
    await app.caught_up()
    room = app.rooms.get(cmd.room)
    app.settle(room)  # departures the list no longer shows are announced first
    return RoomMembersReply(room=room.name, members=_members(room))


def _members(room: LiveRoom) -> list[str]:
    """The member names, encoded once per change of membership (chatd.rooms), spliced in."""
    return cast("list[str]", room.members_json())


async def channels(app: App, req: Request, cmd: c.Channels) -> ChannelsReply:
    """Rooms (name order), then known users (name order), a page at a time. [chatd] The
    cursor names the kind: `after` is "room:NAME" or "user:NAME", as `next` gives it."""
    await app.caught_up()
    kind, name = _channel_cursor(cmd.after) if cmd.after is not None else ("room", None)
    page = _Page(app, _list_limit(app, cmd.limit))
    last: str | None = None
    if kind == "room":
        _, rooms, start = app.rooms.after(name)
        for room in rooms[start:]:
            if not page.add(Channel(name=room.name, type="room")):
                break
            last = f"room:{room.name}"
        name = None
    if not page.full:
        for user in _known_users(app, name):
            if not page.add(Channel(name=user, type="user")):
                break
            last = f"user:{user}"
    entries = cast("list[Channel]", page.items)  # each encoded once, spliced in as is
    if page.full:
        return ChannelsReply(channels=entries, more=True, next=last or cmd.after)
    return ChannelsReply(channels=entries, more=False)


def _known_users(app: App, after: str | None) -> list[str]:
    """Registered users and online guests, in name order, after `after` (case-folded)."""
    names = [u.name for u in app.accounts.users()]
    names += app.accounts.guest_names()
    ordered = sorted(set(names), key=str.lower)
    if after is None:
        return ordered
    keys = [n.lower() for n in ordered]
    return ordered[bisect.bisect_right(keys, after):]
