"""Framing over real sockets (wire contract, "Framing" and "Client frames")."""

from __future__ import annotations

import asyncio

from tests.helpers import Client


async def test_hello_comes_first_and_describes_the_server(connect) -> None:
    c = await connect()
    data = c.hello["data"]
    assert data["server"] == "chatd" and data["protocol"] == 1
    assert data["max_frame"] == 65536 and data["max_text"] == 4000
    assert data["history_limit"] == 500 and isinstance(data["rev"], int) and data["epoch"]


async def test_crlf_and_blank_lines(connect) -> None:
    c = await connect()
    await c.send_raw(b'\r\n   \n\t\r\n{"cmd":"ping","id":1}\r\n\n{"cmd":"ping","id":2}\n')
    assert (await c.reply(1))["data"] == {"pong": True}
    assert (await c.reply(2))["data"] == {"pong": True}


async def test_fifty_pipelined_frames_answered_in_order(connect) -> None:
    c = await connect()
    await c.send_raw(b"".join(b'{"cmd":"ping","id":%d}\n' % i for i in range(50)))
    ids = [(await c.recv())["id"] for _ in range(50)]
    assert ids == list(range(50))


async def test_invalid_utf8_is_bad_frame(connect) -> None:
    c = await connect()
    await c.send_raw(b'{"cmd":"ping","id":1,"x":"\xff\xfe"}\n')
    frame = await c.recv()
    assert frame["type"] == "error" and frame["code"] == "bad_frame" and frame["id"] is None
    assert (await c.ok("ping")) == {"pong": True}


async def test_frames_that_are_not_objects_or_lack_a_command(connect) -> None:
    c = await connect()
    for raw, code in [
        (b"[]", "bad_frame"),
        (b'"x"', "bad_frame"),
        (b"nope", "bad_frame"),
        (b"{}", "bad_request"),
        (b'{"cmd":5}', "bad_request"),
    ]:
        await c.send_raw(raw + b"\n")
        frame = await c.recv()
        assert frame["type"] == "error" and frame["code"] == code, (raw, frame)
        assert frame["id"] is None


async def test_unknown_command_echoes_id(connect) -> None:
    c = await connect()
    frame = await c.call("no.such.thing")
    assert frame["code"] == "unknown_command" and frame["message"]


async def test_missing_field_is_bad_request_naming_it(connect) -> None:
    c = await connect()
    await c.guest("ann")
    frame = await c.error("room.join", "bad_request")
    assert "room" in frame["message"]


async def test_out_of_range_integers_and_long_ids_are_bad_request(connect) -> None:
    c = await connect()
    await c.send_raw(b'{"cmd":"sync","id":7,"since":9223372036854775808}\n')
    frame = await c.recv()
    assert frame["code"] == "bad_request" and frame["id"] == 7
    await c.send_raw(b'{"cmd":"sync","id":8,"since":-1}\n')
    assert (await c.recv())["code"] == "bad_request"
    await c.send_raw(b'{"cmd":"ping","id":"' + b"x" * 129 + b'"}\n')
    frame = await c.recv()
    assert frame["code"] == "bad_request" and frame["id"] is None
    await c.send_raw(b'{"cmd":"ping","id":"' + b"x" * 128 + b'"}\n')
    assert (await c.recv())["type"] == "ok"


async def test_deep_nesting_is_bad_frame(connect) -> None:
    c = await connect()
    await c.send_raw(b'{"cmd":"ping","x":' + b"[" * 5000 + b"]" * 5000 + b"}\n")
    assert (await c.recv())["code"] == "bad_frame"
    assert (await c.ok("ping")) == {"pong": True}


async def test_line_of_exactly_max_frame_is_accepted(connect) -> None:
    c = await connect()
    head = b'{"cmd":"ping","id":1,"pad":"'
    tail = b'"}'
    line = head + b"x" * (65536 - len(head) - len(tail)) + tail
    assert len(line) == 65536
    await c.send_raw(line + b"\r\n")
    assert (await c.recv())["type"] == "ok"
    await c.send_raw(line[:-2] + b'x"}\n')
    frame = await c.recv()
    assert frame["code"] == "frame_too_large" and frame["id"] is None


async def test_ten_megabyte_line_is_skipped_while_others_are_served(server, connect) -> None:
    big = await connect()
    other = await connect()
    # The tail of the long line looks like a command: it must never run.
    chunk = b"x" * 65536
    await big.send_raw(b'{"cmd":"ping","id":"big","pad":"')
    for i in range(160):
        await big.send_raw(chunk)
        if i % 20 == 0:
            assert (await other.ok("ping")) == {"pong": True}
    await big.send_raw(b'"}\n{"cmd":"ping","id":"after"}\n')
    frame = await big.recv()
    assert frame["code"] == "frame_too_large" and frame["id"] is None
    assert (await big.reply("after"))["data"] == {"pong": True}
    await big.send_raw(b'x{"cmd":"ping","id":"smuggled"}\n')
    assert (await big.recv())["code"] == "bad_frame"


async def test_client_that_disconnects_mid_frame(server, connect) -> None:
    c = await connect()
    await c.guest("zed")
    await c.ok("room.create", room="lobby")
    watcher = await connect()
    await watcher.guest("amy")
    await watcher.ok("room.join", room="lobby")
    await c.send_raw(b'{"cmd":"msg.send","room":"lobby","text":"never"')
    await c.close()
    left = await watcher.event("member.left")
    assert left == {"room": "lobby", "user": "zed", "reason": "disconnected"}
    assert (await watcher.ok("room.history", room="lobby"))["messages"] == []


async def test_a_partial_frame_at_eof_is_never_executed(server) -> None:
    c = await Client.connect(server.port)
    await c.send_raw(b'{"cmd":"login","user":"ghost"}')
    c.writer.write_eof()
    assert await asyncio.wait_for(c.reader.read(), 5) == b""
    await c.close()
    d = await Client.connect(server.port)
    await d.guest("ghost")  # the name was never taken
    await d.close()
