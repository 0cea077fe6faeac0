"""The sans-I/O wire protocol: framing, commands, frames, models. Never imports asyncio."""

from chatd.protocol.commands import ALL_COMMANDS, AnyCommand, Command, command_name
from chatd.protocol.decode import FrameError, decode_command
from chatd.protocol.frames import encode_json, error_frame, event_frame, ok_frame
from chatd.protocol.framing import TOO_LARGE, LineSplitter
from chatd.protocol.models import Message, RenamedRoomInfo, RoomInfo, rfc3339

__all__ = [
    "ALL_COMMANDS",
    "TOO_LARGE",
    "AnyCommand",
    "Command",
    "FrameError",
    "LineSplitter",
    "Message",
    "RenamedRoomInfo",
    "RoomInfo",
    "command_name",
    "decode_command",
    "encode_json",
    "error_frame",
    "event_frame",
    "ok_frame",
    "rfc3339",
]
