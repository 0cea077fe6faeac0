"""msg.*, room.history, dm.history and sync (wire contract, "Commands", "Revisions")."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import msgspec

from chatd import changes
from chatd.bus import ToRoom
from chatd.config import Config
from chatd.errors import BadRequest, ChatError, Forbidden, NotFound
from chatd.protocol import commands as c
from chatd.protocol.events import Event, MessageEdited, MessagePosted
from chatd.protocol.frames import encode_json
from chatd.protocol.models import Message
from chatd.protocol.replies import EMPTY, Empty, HistoryReply, MessageReply, SyncReply
from chatd.store.base import MessageRecord, NewMessage

if TYPE_CHECKING:
    from chatd.app import App
    from chatd.dispatch import Request


def check_text(text: str, config: Config) -> None:
    if not text or len(text) > config.max_text:
        raise BadRequest(f"text must be 1 to {config.max_text} characters")
    if text.isspace():
        raise BadRequest("text must not be only whitespace")


def check_send(cmd: c.MsgSend, config: Config) -> None:
    if (cmd.room is None) == (cmd.to is None):
        raise BadRequest("msg.send needs exactly one of `room` or `to`")
    check_text(cmd.text, config)


def check_edit(cmd: c.MsgEdit, config: Config) -> None:
    check_text(cmd.text, config)


def check_limit(cmd: c.RoomHistory | c.DmHistory | c.Sync, config: Config) -> None:
    if cmd.limit is not None and cmd.limit <= 0:
        raise BadRequest("limit must be at least 1")


def emit_message_event(app: App, req: Request, m: MessageRecord, event: Event) -> None:
    """A message's event goes to the room, or to both identities' connections (a DM: not
    to whoever holds those names now): chatd.changes.audiences. A bus that carries
    revisions (several nodes) delivers it from the change stream instead, in revision
    order on every node (given this one, it need not build it again)."""
    if app.bus.carries_revisions:
        app.bus.posted(m.rev, event)
        return
    if m.room_id is not None:  # changes.audiences' room case, inlined (every room message)
        room = app.rooms.by_id.get(m.room_id)
        if room is not None:
            app.settle(room)  # departures before this message are announced first
            req.events.append((ToRoom(room), event))  # req.emit, inlined
        return
    for audience in changes.audiences(app.rooms, m):  # a DM: its two users
        req.emit(audience, event)


async def send(app: App, req: Request, cmd: c.MsgSend) -> MessageReply:
    key = req.identity  # nonces are the sender's own, not its name's next holder's
    if cmd.nonce is not None:
        seen = app.nonces.get(key, cmd.nonce)
        if seen is not None:
            # The message as it is now (edited or deleted since), as after a restart.
            current = await app.store.get_message(seen)
            if current is not None:
                _room_still_there(app, current)
                return MessageReply(message=changes.message_of(app.rooms, current))
    try:
        room_id = _may_send(app, req, cmd)
        app.limits.spend_send(req.user_key, req.session)
    except ChatError:
        # A retry after a dropped connection may come before re-joining: a nonce
        # already used answers with the original message (contract, "Revisions").
        if cmd.nonce is not None:
            old = await app.store.find_nonce(key, cmd.nonce)
            if old is not None:
                _room_still_there(app, old)
                return MessageReply(message=changes.message_of(app.rooms, old))
        raise
    rec, created = await app.store.add_message(
        NewMessage(
            room_id,
            req.user,
            _recipient(app, cmd),
            cmd.text,
            app.clock.now(),
            cmd.nonce,
            key,
            app.accounts.current_identity(cmd.to) if cmd.to is not None else None,
        )
    )
    _room_still_there(app, rec)
    event = MessagePosted(changes.message_of(app.rooms, rec))
    if cmd.nonce is not None:
        app.nonces.remember(key, cmd.nonce, rec.id)
    if created:
        app.stats.messages += 1
        emit_message_event(app, req, rec, event)
    # The message encoded once, for the reply and the event alike (a Raw in a reply
    # Struct's field, chatd.protocol.replies; no typing.cast: a call per send).
    return MessageReply(message=event.message_json())  # type: ignore[arg-type]


def _room_still_there(app: App, rec: MessageRecord) -> None:
    """A room can go (deleted, or ephemeral and emptied) while a write waits; its message
    goes with it, so the answer is not_found, never a message with no room."""
    if rec.room_id is not None and rec.room_id not in app.rooms.by_id:
        raise NotFound("the room was deleted")


def _recipient(app: App, cmd: c.MsgSend) -> str | None:
    return app.accounts.display_name(cmd.to) if cmd.to is not None else None


def _may_send(app: App, req: Request, cmd: c.MsgSend) -> int | None:
    if cmd.room is not None:
        room = app.rooms.get(cmd.room)
        if not room.open and not room.has_user(req.user_key):
            raise Forbidden(f"join {room.name} before sending to it")
        return room.id
    assert cmd.to is not None
    if not app.accounts.known_user(cmd.to):
        raise NotFound(f"no user {cmd.to!r}")
    return None


async def _visible(app: App, req: Request, message_id: int) -> MessageRecord:
    m = await app.store.get_message(message_id)
    if m is None or m.deleted:
        raise NotFound(f"no message {message_id}")
    if m.room_id is None:
        me = req.identity
        if me not in (m.sender_key, m.recipient_key):
            raise NotFound(f"no message {message_id}")  # a DM is only its two users'
    elif m.room_id not in app.rooms.by_id:
        raise NotFound(f"no message {message_id}")
    return m


def _may_change(req: Request, m: MessageRecord, verb: str) -> None:
    own = m.sender_key == req.identity
    if req.has(f"msg:{verb}:any") or (own and req.has(f"msg:{verb}")):
        return
    need = f"msg:{verb}" if own else f"msg:{verb}:any"
    raise Forbidden(f"{verb}ing this message needs the {need} grant")


async def edit(app: App, req: Request, cmd: c.MsgEdit) -> MessageReply:
    m = await _visible(app, req, cmd.message_id)
    _may_change(req, m, "edit")
    app.limits.spend_send(req.user_key, req.session)
    rec = await app.store.edit_message(m.id, cmd.text, app.clock.now(), req.user)
    if rec is None:
        raise NotFound(f"no message {cmd.message_id}")
    _room_still_there(app, rec)
    event = MessageEdited(changes.message_of(app.rooms, rec))
    emit_message_event(app, req, rec, event)
    return MessageReply(message=cast(Message, event.message_json()))  # encoded once


async def delete(app: App, req: Request, cmd: c.MsgDelete) -> Empty:
    m = await _visible(app, req, cmd.message_id)
    _may_change(req, m, "delete")
    rec = await app.store.delete_message(m.id, req.user)
    if rec is None:
        raise NotFound(f"no message {cmd.message_id}")
    _room_still_there(app, rec)
    emit_message_event(app, req, rec, changes.deleted(app.rooms, rec, req.user))
    return EMPTY


def _limit(app: App, asked: int | None, default: int) -> int:
    return min(asked or default, app.config.history_limit)


def page_of(
    app: App, recs: list[MessageRecord], more: bool, keep_newest: bool
) -> tuple[list[Message], list[MessageRecord], bool]:
    """Encode a page once and trim it to the byte budget, dropping from the far end of
    travel: the messages (each encoded once, a ``msgspec.Raw`` spliced into the reply
    Struct as it is), the records kept, and `more`."""
    budget = app.config.history_page_bytes - 64
    encoded = [msgspec.Raw(encode_json(changes.message_of(app.rooms, r))) for r in recs]
    sizes = [len(e) + 1 for e in encoded]
    if sum(sizes) <= budget:
        return cast("list[Message]", encoded), recs, more
    total = 0
    order = range(len(recs) - 1, -1, -1) if keep_newest else range(len(recs))
    kept: list[int] = []
    for i in order:
        if total + sizes[i] > budget:
            break
        total += sizes[i]
        kept.append(i)
    kept.sort()
    return cast("list[Message]", [encoded[i] for i in kept]), [recs[i] for i in kept], True


async def room_history(app: App, req: Request, cmd: c.RoomHistory) -> HistoryReply:
    room = app.rooms.get(cmd.room)
    limit = _limit(app, cmd.limit, app.config.history_default)
    recs, more = await app.store.room_history(room.id, cmd.before, cmd.after, limit)
    page, _, more = page_of(app, recs, more, cmd.after is None)
    return HistoryReply(messages=page, more=more)


async def dm_history(app: App, req: Request, cmd: c.DmHistory) -> HistoryReply:
    other = cmd.with_
    if other is not None and not app.accounts.is_registered(other.lower()):
        if not await app.store.has_dms_between(req.identity, other):
            raise NotFound(f"no user {other!r}")
    limit = _limit(app, cmd.limit, app.config.history_default)
    recs, more = await app.store.dm_history(req.identity, other, cmd.before, cmd.after, limit)
    page, _, more = page_of(app, recs, more, cmd.after is None)
    return HistoryReply(messages=page, more=more)


async def sync(app: App, req: Request, cmd: c.Sync) -> SyncReply:
    # Everything committed up to `now_rev` is visible to the read that follows.
    now_rev = app.store.rev
    limit = _limit(app, cmd.limit, app.config.history_limit)
    room_ids = [r.id for r in app.rooms.rooms_of(req.session)]
    recs, more = await app.store.changes_since(cmd.since, room_ids, req.identity, limit)
    page, kept, more = page_of(app, recs, more, keep_newest=False)
    if more:
        rev = kept[-1].rev if kept else cmd.since
    else:
        rev = max([now_rev] + [m.rev for m in kept])
    return SyncReply(changes=page, rev=rev, more=more)
