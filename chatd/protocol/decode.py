"""Turn one line into a Command, or a typed error that names what is wrong.

The happy path is one pass of one shared msgspec Decoder. Only a failed frame pays for a
second, lenient look, which finds the request id to echo and picks the error code in the
contract's order: JSON (`bad_frame`), then command (`unknown_command`/`bad_request`),
then fields (`bad_request`).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from chatd.errors import BadFrame, BadRequest, ChatError, UnknownCommand
from chatd.protocol.commands import (
    ALL_COMMANDS,
    NAME_HELP,
    AnyCommand,
    Command,
    command_name,
    is_valid_name,
    name_fields,
)

_decoder: msgspec.json.Decoder[AnyCommand] = msgspec.json.Decoder(AnyCommand)
# float_hook: a number too big for a float (1e400) is a number out of range, a
# `bad_request` naming the field, not unreadable JSON (protocol.md, "Client frames").
_lenient = msgspec.json.Decoder(float_hook=float)
_NAME_FIELDS = {cls: name_fields(cls) for cls in ALL_COMMANDS}
# Names already found valid (a pure check, memoized: the same rooms and users recur). Kept
# small: a check costs ~0.15 µs, and at 65,536 entries every login name of 10,000 guests
# stayed here (≈0.1 KiB a connection) long after its one use.
_good_names: set[str] = set()
_GOOD_NAMES_MAX = 4_096
_MAX_ID = 2**63 - 1
_NAMES = frozenset(command_name(cls) for cls in ALL_COMMANDS)


class FrameError(Exception):
    """A frame that cannot be executed: the error to send and the id to echo."""

    def __init__(self, error: ChatError, request_id: int | str | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.request_id = request_id


def decode_command(line: bytes, one_cmd: bool = False) -> Command:
    """Decode a line (without terminator). Raises FrameError.

    ``one_cmd``: the caller vouches that the line has at most one literal ``"cmd"`` and no
    escaped key (it came from a chunk that `one_cmd_per_line` passed), so the repeated-key
    check is skipped."""
    try:
        if not line.isascii():
            line.decode("utf-8")  # msgspec skips invalid UTF-8 in ignored fields
        cmd: Command = _decoder.decode(line)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: first
        raise _explain(line, str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise FrameError(BadFrame("frame is not valid JSON"), None) from None
    except RecursionError:
        raise FrameError(BadFrame("frame is nested too deeply"), None) from None
    # A second "cmd" key is legal JSON that the decoder quietly reads once; look closer
    # only when the bytes allow it: "cmd" twice, or a key spelled with a \u006x escape
    # (no backslash at all is the usual case, and `92 in line` is a memchr). One count,
    # not a cheaper-looking count of "c" first: any method call costs as much as the
    # count itself on a short frame, and frames with text have many "c"s.
    if (
        not one_cmd
        and (line.count(b'"cmd"') > 1 or (92 in line and b"\\u006" in line))
        and _cmd_repeated(line)
    ):
        raise FrameError(BadRequest("field `cmd` is given more than once"), cmd.id)
    for attr, wire in _NAME_FIELDS[type(cmd)]:
        name = getattr(cmd, attr)
        if name is not None and name not in _good_names:
            if not is_valid_name(name):
                raise FrameError(BadRequest(f"invalid name at `$.{wire}`: {NAME_HELP}"), cmd.id)
            if len(_good_names) >= _GOOD_NAMES_MAX:
                _good_names.clear()
            _good_names.add(name)
    return cmd


# The chunk check below costs about three per-frame checks: worth it only for a chunk
# that likely holds several frames (a msg.send is ~90 bytes, a ping ~25).
ONE_CMD_MIN_CHUNK = 256


def one_cmd_per_line(chunk: bytes) -> bool:
    """Whether every line in ``chunk`` has at most one key "cmd", checked once for the whole
    read chunk instead of once per frame (pipelined frames arrive many to a chunk).

    Exact, not a guess: with no ``\\u006`` in the chunk a key "cmd" can only be spelled
    ``"cmd"`` (a quote inside a string is escaped, so the bytes cannot occur there either);
    the lines that start with ``{"cmd"`` (the first, tested, and those after
    ``\\n{"cmd"``, counted) have one each at least, so when the total count equals their
    number each has exactly one, and every other line (or partial last line) none.
    False means only "check each frame", as `decode_command` does by default. A partial
    last line is completed by a later push, which must not keep the vouch."""
    return (
        len(chunk) >= ONE_CMD_MIN_CHUNK
        and chunk.startswith(b'{"cmd"')
        and (92 not in chunk or b"\\u006" not in chunk)
        and chunk.count(b'"cmd"') == chunk.count(b'\n{"cmd"') + 1
    )


def _explain(line: bytes, detail: str) -> FrameError:
    try:
        raw: Any = _lenient.decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return FrameError(BadFrame("frame is not valid JSON"), None)
    if not isinstance(raw, dict):
        return FrameError(BadFrame("frame must be a JSON object"), None)
    rid = _request_id(raw.get("id"))
    cmd = raw.get("cmd")
    if cmd is None and "cmd" not in raw:
        return FrameError(BadRequest("missing required field `cmd`"), rid)
    if not isinstance(cmd, str):
        return FrameError(BadRequest("field `cmd` must be a string"), rid)
    if detail.endswith("at `$.cmd`"):
        if cmd in _NAMES:  # `cmd` given twice, with different values
            return FrameError(BadRequest("field `cmd` is given more than once"), rid)
        return FrameError(UnknownCommand(f"unknown command {cmd[:64]!r}; send help"), rid)
    return FrameError(BadRequest(detail), rid)


def _cmd_repeated(line: bytes) -> bool:
    """Whether the frame's top-level object has the key "cmd" more than once."""
    top: list[list[tuple[str, Any]]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        top.append(items)  # the outermost object comes last
        return {}

    try:
        json.loads(line, object_pairs_hook=pairs)
    except (ValueError, RecursionError):  # msgspec read it; never expected here
        return False
    return sum(1 for key, _ in top[-1] if key == "cmd") > 1


def _request_id(value: object) -> int | str | None:
    # Echo the id only when it is itself valid; otherwise the reply's id is null.
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 <= value <= _MAX_ID:
        return value
    if isinstance(value, str) and len(value) <= 128:
        return value
    return None
