"""The asyncio client library for chatd (see clients/README.md).

async with connect("127.0.0.1", 7777, user="ann", password="…") as chat:
    await chat.join("lobby")
    await chat.send("hello", room="lobby")
    async for event in chat.events():
        ...

Inside: ``codec.py`` (sans-I/O: bytes -> events, replies settled by id from the pending
map; commands -> bytes), ``recovery.py`` (sans-I/O: the session state and the commands
that restore it after a reconnect: re-auth, re-join, sync, resend of queued sends),
``client.py`` (the asyncio layer: sockets, the reconnect loop, one method per command),
``events.py`` (bounded event streams), ``errors.py``, ``types.py``; reply data are the
server's own Structs from ``chatd.protocol.replies``.
"""

from chatd.protocol.replies import PasswdReply, StatsReply, UserEntry, WhoAmIReply
from chatd_client.bot import Bot
from chatd_client.client import (
    AUTH_FAILED,
    Backoff,
    Client,
    EventStream,
    ExponentialBackoff,
    Options,
    connect,
    encode_command,
    iter_messages,
)
from chatd_client.errors import (
    ERRORS,
    BadFrame,
    BadRequest,
    ClientClosed,
    ClientError,
    Conflict,
    ConnectionLost,
    Forbidden,
    FrameTooLarge,
    Internal,
    NotFound,
    RateLimited,
    RequestTimeout,
    ServerError,
    SessionEnded,
    TokenExpired,
    Unauthorized,
    UnknownCommand,
)
from chatd_client.types import (
    DISCONNECTED,
    EPOCH_CHANGED,
    EVENTS_DROPPED,
    RECONNECTED,
    REJOIN_FAILED,
    AuthResult,
    Channel,
    CommandHelp,
    Event,
    Hello,
    HistoryPage,
    JoinResult,
    LoginResult,
    Members,
    Message,
    RefreshResult,
    RoomInfo,
    SyncPage,
)

__all__ = [
    "AUTH_FAILED",
    "DISCONNECTED",
    "EPOCH_CHANGED",
    "ERRORS",
    "EVENTS_DROPPED",
    "RECONNECTED",
    "REJOIN_FAILED",
    "AuthResult",
    "Backoff",
    "BadFrame",
    "BadRequest",
    "Bot",
    "Channel",
    "Client",
    "ClientClosed",
    "ClientError",
    "CommandHelp",
    "Conflict",
    "ConnectionLost",
    "Event",
    "EventStream",
    "ExponentialBackoff",
    "Forbidden",
    "FrameTooLarge",
    "Hello",
    "HistoryPage",
    "Internal",
    "JoinResult",
    "LoginResult",
    "Members",
    "Message",
    "NotFound",
    "Options",
    "PasswdReply",
    "RateLimited",
    "RefreshResult",
    "RequestTimeout",
    "RoomInfo",
    "ServerError",
    "SessionEnded",
    "StatsReply",
    "SyncPage",
    "TokenExpired",
    "Unauthorized",
    "UnknownCommand",
    "UserEntry",
    "WhoAmIReply",
    "connect",
    "encode_command",
    "iter_messages",
]
