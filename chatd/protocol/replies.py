"""One msgspec Struct per command's ``ok`` data (wire contract, "Commands"; protocol.md's
command table), and ``REPLIES``: command name -> its reply Struct.

These are the wire's own shapes: the server's handlers return them (chatd.dispatch encodes
the reply frame; tests/unit/test_reply_values.py holds every handler to its Struct), and the
client decodes replies with them. The wire tests decode real replies and encode them again,
byte for byte.

Decoding ignores fields a Struct does not name (msgspec's default), so a newer server may
add fields without breaking an older client; fields chatd added beyond the contract
(marked [chatd]) have defaults, so a reply without them still decodes.

A handler that encoded entries once to measure a page against its byte budget (history,
room.list, channels) or to reuse them (a room's member list) puts those ``msgspec.Raw``
values in the field (typed with a cast): encoding does not check types, and the bytes are
the same.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from chatd.protocol.models import Message, RoomInfo

__all__ = [
    "EMPTY",
    "REPLIES",
    "AuthReply",
    "Channel",
    "ChannelsReply",
    "CommandHelp",
    "EditReply",
    "Empty",
    "HelpReply",
    "HistoryReply",
    "LoginReply",
    "MessageReply",
    "PasswdReply",
    "PingReply",
    "RefreshReply",
    "RegisterReply",
    "Reply",
    "RoomJoinReply",
    "RoomListReply",
    "RoomMembersReply",
    "RoomReply",
    "SendReply",
    "StatsReply",
    "SyncReply",
    "UserEntry",
    "UserListReply",
    "WhoAmIReply",
    "reply_type",
]


class Reply(msgspec.Struct, frozen=True):
    """Base of every reply Struct."""


class Empty(Reply, frozen=True):
    """``{}``: logout, user.delete, room.delete, room.leave, msg.delete."""


EMPTY = Empty()


class PingReply(Reply, frozen=True):
    pong: bool = True


class CommandHelp(Reply, frozen=True):
    """One entry of ``help``, as the command table has it (protocol.md, "help")."""

    cmd: str
    summary: str = ""  # [chatd] the usage with its token and grant needs, in one line
    usage: str = ""
    auth: bool = True
    grant: str | None = None


class HelpReply(Reply, frozen=True):
    commands: list[CommandHelp]


class RegisterReply(Reply, frozen=True):
    user: str


class LoginReply(Reply, frozen=True):
    token: str
    user: str
    grants: list[str]
    expires_at: int  # unix seconds


class AuthReply(Reply, frozen=True):
    """The reply to ``auth`` (and, same shape, ``whoami``)."""

    user: str
    grants: list[str]
    expires_at: int


class WhoAmIReply(AuthReply, frozen=True):
    pass


class RefreshReply(Reply, frozen=True):
    """The reply to ``refresh`` (and, same shape, ``passwd``)."""

    token: str
    expires_at: int


class PasswdReply(RefreshReply, frozen=True):
    pass


class UserEntry(Reply, frozen=True):
    name: str
    admin: bool


class UserListReply(Reply, frozen=True):
    users: list[UserEntry]


class RoomReply(Reply, frozen=True):
    """room.create and room.edit."""

    room: RoomInfo


class RoomListReply(Reply, frozen=True, omit_defaults=True):
    """[chatd] paged: ``next`` (the cursor for ``after``) is there only when ``more``."""

    rooms: list[RoomInfo]
    more: bool
    next: str | None = None


class RoomJoinReply(Reply, frozen=True):
    room: RoomInfo
    members: list[str]


class RoomMembersReply(Reply, frozen=True):
    room: str
    members: list[str]


class HistoryReply(Reply, frozen=True):
    """room.history and dm.history: oldest first."""

    messages: list[Message]
    more: bool


class MessageReply(Reply, frozen=True):
    """msg.send and msg.edit."""

    message: Message


SendReply = MessageReply
EditReply = MessageReply


class SyncReply(Reply, frozen=True):
    changes: list[Message]
    rev: int
    more: bool


class Channel(Reply, frozen=True):
    name: str
    type: Literal["room", "user"]


class ChannelsReply(Reply, frozen=True, omit_defaults=True):
    """[chatd] paged like room.list: ``next`` only when ``more``."""

    channels: list[Channel]
    more: bool
    next: str | None = None


class StatsReply(Reply, frozen=True):
    """``stats`` (protocol.md, "stats"). The first seven fields are the contract's; the
    rest are [chatd] and default to zero when absent; fields added later are ignored."""

    version: str
    uptime: float
    connections: int
    users_online: int
    rooms: int
    messages: int
    rev: int
    connections_logged_in: int = 0
    connections_guests: int = 0
    connections_handshaking: int = 0
    tls: bool = False
    rate_window: int = 0
    commands_per_s: float = 0.0
    messages_per_s: float = 0.0
    deliveries_per_s: float = 0.0
    bytes_in_per_s: float = 0.0
    bytes_out_per_s: float = 0.0
    commands_total: int = 0
    messages_total: int = 0
    deliveries_total: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    slow_consumers: int = 0
    stuck_writers: int = 0
    idle_closed: int = 0
    rate_limited: int = 0
    throttled: int = 0
    bad_frames: int = 0
    login_bursts: int = 0
    tls_handshake_failures: int = 0
    refused: dict[str, int] = msgspec.field(default_factory=dict)
    store_commit_p50_ms: float | None = None
    store_commit_p99_ms: float | None = None
    store_errors: int = 0
    rss_bytes: int | None = None


# Command name -> the Struct of its ok data. A unit test checks that every command in the
# command table has one.
REPLIES: dict[str, type[Reply]] = {
    "ping": PingReply,
    "help": HelpReply,
    "register": RegisterReply,
    "login": LoginReply,
    "auth": AuthReply,
    "refresh": RefreshReply,
    "logout": Empty,
    "whoami": WhoAmIReply,
    "passwd": PasswdReply,
    "user.delete": Empty,
    "user.list": UserListReply,
    "room.create": RoomReply,
    "room.edit": RoomReply,
    "room.delete": Empty,
    "room.list": RoomListReply,
    "room.join": RoomJoinReply,
    "room.leave": Empty,
    "room.members": RoomMembersReply,
    "room.history": HistoryReply,
    "msg.send": SendReply,
    "msg.edit": EditReply,
    "msg.delete": Empty,
    "dm.history": HistoryReply,
    "sync": SyncReply,
    "channels": ChannelsReply,
    "stats": StatsReply,
}


def reply_type(command: str) -> type[Reply]:
    """The reply Struct of a command name. Raises KeyError for an unknown command."""
    return REPLIES[command]
