"""One msgspec Struct per client command, a tagged union on ``cmd`` (wire contract,
"Client frames" and "Commands"). Field constraints here are checked while decoding,
so a malformed field is ``bad_request`` before any token is looked at.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Union

import msgspec

# The field limits the wire contract fixes, in one place (decode.py and the Structs below use
# these; they are not settings: clients rely on them).
MAX_INT = 2**63 - 1  # integers in frames are 0 … 2^63−1 (SQLite overflows past int64)
MAX_ID_CHARS = 128  # a string request `id`
MAX_NAME_CHARS = 32  # user and room names
MAX_TOPIC_CHARS = 256  # a room topic, in code points
MAX_NONCE_CHARS = 64

UInt = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
RequestId = Union[UInt, Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)], None]
# Names: 1–32 of A-Z a-z 0-9 _ . -, not starting with . or -.
# The character rule is checked after decoding (decode.py), with a cache: a regex in the
# Struct costs more than the rest of decoding a frame.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
_NAME_RULE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
NAME_HELP = "1-32 of A-Z a-z 0-9 _ . - not starting with . or -"


def is_valid_name(name: str) -> bool:
    """Contract, "Identity and tokens": 1–32 of A-Z a-z 0-9 _ . -, not starting with . or -."""
    return _NAME_RULE.fullmatch(name) is not None
Topic = Annotated[str, msgspec.Meta(max_length=MAX_TOPIC_CHARS)]
Nonce = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NONCE_CHARS)]


class Command(msgspec.Struct, tag_field="cmd", kw_only=True, frozen=True):
    id: RequestId = None
    token: str | None = None


class Ping(Command, tag="ping", frozen=True):
    pass


class Help(Command, tag="help", frozen=True):
    command: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class Register(Command, tag="register", frozen=True):
    user: Name
    password: str


class Login(Command, tag="login", frozen=True):
    user: Name
    password: str | None = None
    grants: list[str] | None = None
    ttl: UInt | None = None


class Auth(Command, tag="auth", frozen=True):
    pass


class Refresh(Command, tag="refresh", frozen=True):
    pass


class Logout(Command, tag="logout", frozen=True):
    all: bool = False


class WhoAmI(Command, tag="whoami", frozen=True):
    pass


class UserDelete(Command, tag="user.delete", frozen=True):
    user: Name


class Passwd(Command, tag="passwd", frozen=True):
    password: str
    new_password: str


class UserList(Command, tag="user.list", frozen=True):
    pass


class RoomCreate(Command, tag="room.create", frozen=True):
    room: Name
    topic: Topic | None = None
    ephemeral: bool = False
    open: bool = False


class RoomEdit(Command, tag="room.edit", frozen=True):
    room: Name
    topic: Topic | None = None
    name: Name | None = None


class RoomDelete(Command, tag="room.delete", frozen=True):
    room: Name


class RoomList(Command, tag="room.list", frozen=True):
    after: Name | None = None  # [chatd] a room name: the page starts after it
    limit: UInt | None = None


class RoomJoin(Command, tag="room.join", frozen=True):
    room: Name


class RoomLeave(Command, tag="room.leave", frozen=True):
    room: Name


class RoomMembers(Command, tag="room.members", frozen=True):
    room: Name


class RoomHistory(Command, tag="room.history", frozen=True):
    room: Name
    before: UInt | None = None
    after: UInt | None = None
    limit: UInt | None = None


class MsgSend(Command, tag="msg.send", frozen=True):
    text: str
    room: Name | None = None
    to: Name | None = None
    nonce: Nonce | None = None


class MsgEdit(Command, tag="msg.edit", frozen=True):
    message_id: UInt
    text: str


class MsgDelete(Command, tag="msg.delete", frozen=True):
    message_id: UInt


class DmHistory(Command, tag="dm.history", frozen=True):
    with_: Name | None = msgspec.field(default=None, name="with")
    before: UInt | None = None
    after: UInt | None = None
    limit: UInt | None = None


class Sync(Command, tag="sync", frozen=True):
    since: UInt
    limit: UInt | None = None


# A channels cursor: "room:NAME" or "user:NAME", as the reply's `next` gives it.
ChannelCursor = Annotated[str, msgspec.Meta(min_length=6, max_length=37)]


class Channels(Command, tag="channels", frozen=True):
    after: ChannelCursor | None = None
    limit: UInt | None = None


class Stats(Command, tag="stats", frozen=True):
    pass


AnyCommand = Union[
    Ping,
    Help,
    Register,
    Login,
    Auth,
    Refresh,
    Logout,
    WhoAmI,
    Passwd,
    UserDelete,
    UserList,
    RoomCreate,
    RoomEdit,
    RoomDelete,
    RoomList,
    RoomJoin,
    RoomLeave,
    RoomMembers,
    RoomHistory,
    MsgSend,
    MsgEdit,
    MsgDelete,
    DmHistory,
    Sync,
    Channels,
    Stats,
]


# The union is the one list of commands; the decoder and the command table both use it.
ALL_COMMANDS: tuple[type[Command], ...] = typing.get_args(AnyCommand)


def name_fields(cls: type[Command]) -> tuple[tuple[str, str], ...]:
    """(attribute, wire name) of every field of `cls` that holds a name."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in msgspec.structs.fields(cls):
        hint = hints[f.name]
        if hint == Name or hint == Union[Name, None]:
            out.append((f.name, f.encode_name))
    return tuple(out)


def command_name(cls: type[Command]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag
