"""The sans-I/O wire protocol: framing, commands, replies, events, frames, models. Never
imports asyncio."""

from chatd.protocol.commands import ALL_COMMANDS, AnyCommand, Command, command_name
from chatd.protocol.decode import FrameError, decode_command
from chatd.protocol.events import EVENTS, Event
from chatd.protocol.frames import encode_json, error_frame, ok_frame
from chatd.protocol.framing import TOO_LARGE, LineSplitter
from chatd.protocol.models import Message, RenamedRoomInfo, RoomInfo, rfc3339
from chatd.protocol.replies import REPLIES, Reply, reply_type

__all__ = [
    "ALL_COMMANDS",
    "EVENTS",
    "REPLIES",
    "TOO_LARGE",
    "AnyCommand",
    "Command",
    "Event",
    "FrameError",
    "LineSplitter",
    "Message",
    "RenamedRoomInfo",
    "Reply",
    "RoomInfo",
    "command_name",
    "decode_command",
    "encode_json",
    "error_frame",
    "ok_frame",
    "reply_type",
    "rfc3339",
]
