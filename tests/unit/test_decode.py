"""decode_command: error classes in the contract's order and the id echo rules
(wire contract, "Client frames"; limits.md, integers and ids)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatd.protocol import commands as c
from chatd.protocol.decode import FrameError, decode_command, one_cmd_per_line

MAX_INT = 2**63 - 1


def fail(line: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_command(line)
    return info.value


def frame(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_valid_frames_decode_to_their_structs() -> None:
    cmd = decode_command(b'{"cmd":"ping","id":1}')
    assert isinstance(cmd, c.Ping) and cmd.id == 1 and cmd.token is None
    cmd = decode_command(frame(cmd="msg.send", id="a", room="lobby", text="hi", nonce="n1"))
    assert isinstance(cmd, c.MsgSend)
    assert (cmd.id, cmd.room, cmd.to, cmd.text, cmd.nonce) == ("a", "lobby", None, "hi", "n1")
    cmd = decode_command(frame(cmd="dm.history", **{"with": "bob"}, limit=5))
    assert isinstance(cmd, c.DmHistory) and cmd.with_ == "bob" and cmd.limit == 5


def test_unknown_fields_are_ignored() -> None:
    cmd = decode_command(frame(cmd="ping", id=3, extra={"deep": [1, 2]}, more="x"))
    assert isinstance(cmd, c.Ping) and cmd.id == 3


def test_integer_bounds_are_inclusive() -> None:
    cmd = decode_command(frame(cmd="sync", id=MAX_INT, since=MAX_INT))
    assert isinstance(cmd, c.Sync) and cmd.id == MAX_INT and cmd.since == MAX_INT
    cmd = decode_command(frame(cmd="sync", id=0, since=0))
    assert isinstance(cmd, c.Sync) and cmd.since == 0


@pytest.mark.parametrize(
    "line",
    [
        b"nope",
        b"{",
        b'{"cmd":"ping"} trailing',
        b'{"cmd":"ping","id":1,"x":"\xff\xfe"}',  # invalid UTF-8 inside a string
        b'{"cmd":"ping","id":1,"\xc3":1}',  # invalid UTF-8 in a key
        b"\xef\xbb\xbf{}",  # a BOM is not JSON
        rb'{"cmd":"msg.send","id":1,"room":"a","text":"\ud800"}',  # lone surrogate
        b"[]",
        b'"ping"',
        b"42",
        b"null",
        b'{"cmd":"ping","id":1,"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"[" * 5000 + b"]" * 5000,
        b'{"cmd":"ping","id":1,"x":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
    ],
    ids=[
        "not-json",
        "truncated",
        "trailing",
        "bad-utf8-value",
        "bad-utf8-key",
        "bom",
        "lone-surrogate",
        "array",
        "string",
        "number",
        "null",
        "deep-ignored-field",
        "deep-top-level",
        "deep-objects",
    ],
)
def test_bad_frames_never_echo_an_id(line: bytes) -> None:
    err = fail(line)
    assert err.error.code == "bad_frame"
    assert err.request_id is None
    assert err.error.message


def test_missing_cmd_is_bad_request_and_echoes_id() -> None:
    err = fail(b'{"id":7}')
    assert err.error.code == "bad_request" and err.request_id == 7
    assert "cmd" in err.error.message
    assert fail(b"{}").request_id is None


@pytest.mark.parametrize("value", [5, None, True, ["ping"], {"a": 1}])
def test_non_string_cmd_is_bad_request(value: object) -> None:
    err = fail(frame(cmd=value, id="r"))
    assert err.error.code == "bad_request" and err.request_id == "r"
    assert "cmd" in err.error.message


def test_unknown_command_echoes_id() -> None:
    err = fail(frame(cmd="no.such.thing", id=9))
    assert err.error.code == "unknown_command" and err.request_id == 9
    assert "no.such.thing" in err.error.message
    # Commands are case-sensitive names.
    assert fail(frame(cmd="PING", id=1)).error.code == "unknown_command"


def test_unknown_command_wins_over_its_fields() -> None:
    err = fail(frame(cmd="nope", id=1, room=5))
    assert err.error.code == "unknown_command"


def test_a_very_long_unknown_command_name_is_not_echoed_whole() -> None:
    err = fail(frame(cmd="x" * 10_000, id=1))
    assert err.error.code == "unknown_command" and len(err.error.message) < 200


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"cmd": "room.join"}, "room"),
        ({"cmd": "room.join", "room": 5}, "room"),
        ({"cmd": "room.join", "room": ".dot"}, "room"),
        ({"cmd": "room.join", "room": "x" * 33}, "room"),
        ({"cmd": "room.join", "room": ""}, "room"),
        ({"cmd": "msg.send", "room": "a"}, "text"),
        ({"cmd": "msg.send", "room": "a", "text": 1}, "text"),
        ({"cmd": "msg.send", "room": "a", "text": "x", "nonce": "n" * 65}, "nonce"),
        ({"cmd": "msg.edit", "text": "x"}, "message_id"),
        ({"cmd": "msg.edit", "message_id": "1", "text": "x"}, "message_id"),
        ({"cmd": "msg.delete", "message_id": 1.0}, "message_id"),
        ({"cmd": "msg.delete", "message_id": True}, "message_id"),
        ({"cmd": "sync"}, "since"),
        ({"cmd": "sync", "since": -1}, "since"),
        ({"cmd": "sync", "since": 2**63}, "since"),
        ({"cmd": "sync", "since": 10**30}, "since"),
        ({"cmd": "room.history", "room": "a", "limit": True}, "limit"),
        ({"cmd": "room.history", "room": "a", "before": -5}, "before"),
        ({"cmd": "login", "user": "a", "grants": "admin"}, "grants"),
        ({"cmd": "login", "user": "a", "grants": [1]}, "grants"),
        ({"cmd": "login", "user": "a", "ttl": 2**64}, "ttl"),
        ({"cmd": "logout", "all": "yes"}, "all"),
        ({"cmd": "room.create", "room": "a", "topic": "t" * 257}, "topic"),
        ({"cmd": "ping", "token": 5}, "token"),
        ({"cmd": "dm.history", "with": "-x"}, "with"),
    ],
)
def test_missing_or_mistyped_field_is_bad_request_naming_it(
    fields: dict[str, Any], name: str
) -> None:
    err = fail(frame(id="req", **fields))
    assert err.error.code == "bad_request"
    assert err.request_id == "req"
    assert f"`{name}`" in err.error.message or f"$.{name}" in err.error.message, err.error.message


@pytest.mark.parametrize(
    "rid",
    [-1, 2**63, 10**30, True, False, 1.5, 1.0, "x" * 129, ["a"], {"a": 1}],
    ids=["neg", "2^63", "huge", "true", "false", "float", "float-int", "129chars", "list", "obj"],
)
def test_invalid_id_is_bad_request_with_null_id(rid: object) -> None:
    err = fail(frame(cmd="ping", id=rid))
    assert err.error.code == "bad_request"
    assert err.request_id is None
    assert "id" in err.error.message


@pytest.mark.parametrize("rid", [0, MAX_INT, "", "x" * 128, "é" * 128])
def test_valid_ids_are_accepted(rid: int | str) -> None:
    assert decode_command(frame(cmd="ping", id=rid)).id == rid


def test_null_id_is_no_id() -> None:
    assert decode_command(b'{"cmd":"ping","id":null}').id is None


def test_invalid_id_on_an_unknown_command_is_not_echoed() -> None:
    err = fail(frame(cmd="nope", id=-1))
    assert err.error.code == "unknown_command" and err.request_id is None


def test_valid_id_is_echoed_when_another_field_is_bad() -> None:
    err = fail(frame(cmd="sync", id=MAX_INT, since=-1))
    assert err.request_id == MAX_INT


def test_field_named_id_of_a_message_is_message_id() -> None:
    cmd = decode_command(frame(cmd="msg.delete", id="r1", message_id=42))
    assert isinstance(cmd, c.MsgDelete) and cmd.id == "r1" and cmd.message_id == 42


def test_cmd_given_twice_is_bad_request_not_unknown_command() -> None:
    # Duplicate keys: msgspec checks the second value against the first one's tag.
    err = fail(b'{"cmd":"ping","id":1,"cmd":"help"}')
    assert err.error.code == "bad_request" and err.request_id == 1
    assert "cmd" in err.error.message
    assert fail(b'{"cmd":"ping","cmd":"nope"}').error.code == "unknown_command"


@pytest.mark.parametrize(
    ("line", "rid", "field"),
    [
        (b'{"cmd":"sync","id":5,"since":1e400}', 5, "since"),
        (b'{"cmd":"sync","id":"s","since":-1e400}', "s", "since"),
        (b'{"cmd":"room.history","id":6,"room":"lobby","limit":1E999}', 6, "limit"),
        (b'{"cmd":"ping","id":1e400}', None, "id"),  # the id itself is not valid: null
    ],
)
def test_a_number_too_big_for_a_float_is_bad_request_with_the_id_echoed(
    line: bytes, rid: object, field: str
) -> None:
    # Issue 13, item 13: it was bad_frame with id null.
    err = fail(line)
    assert err.error.code == "bad_request" and err.request_id == rid
    assert f"`$.{field}`" in err.error.message


def test_a_huge_number_in_an_ignored_field_is_ignored() -> None:
    assert isinstance(decode_command(b'{"cmd":"ping","id":1,"pad":1e400}'), c.Ping)


@pytest.mark.parametrize(
    "line",
    [
        b'{"cmd":"ping","cmd":"ping","id":7}',
        b'{"cmd":"ping","id":7,"cmd":"help"}',
        b'{"cmd":"ping","\\u0063md":"ping","id":7}',  # the same key, spelled with an escape
        b'{"\\u0063\\u006d\\u0064":"ping","cmd":"ping","id":7}',
    ],
)
def test_cmd_given_twice_is_bad_request(line: bytes) -> None:
    err = fail(line)
    assert err.error.code == "bad_request" and err.request_id == 7
    assert "more than once" in err.error.message


@pytest.mark.parametrize(
    "line",
    [
        b'{"cmd":"msg.send","room":"a","text":"{\\"cmd\\":\\"x\\",\\"cmd\\":1} \\u0063"}',
        b'{"cmd":"ping","nested":{"cmd":1,"cmd":2}}',
        b'{"cmd":"ping","\\u0063m":"not cmd"}',
    ],
)
def test_cmd_in_texts_or_nested_objects_is_not_a_second_cmd(line: bytes) -> None:
    decode_command(line)


PAD = b',"pad":"' + b"x" * 300 + b'"'  # past the size below which no chunk is vouched for


@pytest.mark.parametrize(
    "chunk",
    [
        b'{"cmd":"ping","id":1' + PAD + b'}\n{"cmd":"ping","id":2}\n',
        b'{"cmd":"ping","id":1' + PAD + b'}\r\n{"cmd":"ping","id":2}\r\n{"cmd":"pi',  # partial
        b'{"cmd":"msg.send","text":"a \\"cmd\\" b"' + PAD + b"}\n",  # quotes escaped
    ],
)
def test_a_chunk_of_lines_with_one_cmd_each_is_vouched_for(chunk: bytes) -> None:
    assert one_cmd_per_line(chunk)


@pytest.mark.parametrize(
    "chunk",
    [
        # one line has "cmd" twice and another none: the totals match the line count
        b'{"cmd":"ping","cmd":"ping","id":1' + PAD + b'}\n{"id":2}\n',
        b'{"id":2' + PAD + b'}\n{"cmd":"ping","cmd":"ping","id":1}\n',
        b'{"cmd":"ping","id":1' + PAD + b',"\\u0063md":"ping"}\n',  # an escaped key
        b'{"cmd":"ping","id":1' + PAD + b'}\n{ "cmd":"ping","cmd":"ping"}\n',  # spaced
        b'{"cmd":"ping","id":1' + PAD + b'}\n\n{"cmd":"ping","text":"cmd"}\n',
        b'{"cmd":"ping","id":1}\n{"cmd":"ping","id":2}\n',  # small: checked per frame
    ],
)
def test_a_chunk_that_may_hold_a_repeated_cmd_is_not_vouched_for(chunk: bytes) -> None:
    assert not one_cmd_per_line(chunk)


def test_a_vouched_line_skips_only_the_repeated_cmd_check() -> None:
    line = b'{"cmd":"ping","id":1' + PAD + b"}"
    assert one_cmd_per_line(line + b"\n")
    assert isinstance(decode_command(line, one_cmd=True), c.Ping)
    with pytest.raises(FrameError) as info:  # everything else is still checked
        decode_command(b'{"cmd":"nope","id":1}', one_cmd=True)
    assert info.value.error.code == "unknown_command"
