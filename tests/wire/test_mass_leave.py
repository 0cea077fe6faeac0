"""Many members of one room dropping at once (issue 13, item 2): every remaining
connection still gets one `member.left` per departed user, once, in one order, and the
room's next events come after them."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

from chatd.server import ChatServer
from tests.helpers import TIMEOUT, Client, guest, second


async def _member(port: int, name: str) -> socket.socket:
    """A raw member connection (cheap: no StreamReader), logged in and in the room."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
    login = {"cmd": "login", "id": 1, "user": name}
    join = {"cmd": "room.join", "id": 2, "room": "crowd"}
    await loop.sock_sendall(sock, (json.dumps(login) + "\n" + json.dumps(join) + "\n").encode())
    data = b""
    while data.count(b'"type":"ok"') < 2:  # hello, then both replies (events ignored)
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), TIMEOUT)
        assert chunk, "closed"
        data += chunk
    return sock


async def _left_events(c: Client, n: int) -> list[str]:
    users = []
    while len(users) < n:
        frame = await c.recv()
        if frame["type"] == "event" and frame["event"] == "member.left":
            assert frame["data"]["room"] == "crowd"
            assert frame["data"]["reason"] == "disconnected"
            users.append(frame["data"]["user"])
    return users


async def test_a_mass_disconnect_tells_every_remaining_connection_of_each_user_once(
    server: ChatServer, connect
) -> None:
    w1 = await guest(connect, "watcher")
    await w1.ok("room.create", room="crowd")
    w2 = await second(connect, w1)  # the same user's other connection
    await w2.ok("room.join", room="crowd")
    other = await guest(connect, "other")
    await other.ok("room.join", room="crowd")
    n = 150
    members = [await _member(server.port, f"m{i}") for i in range(n)]
    for c in (w1, w2, other):
        await c.ok("ping")  # every member.joined is in before the drop
        c.events.clear()
    for i, sock in enumerate(members):
        if i % 2:  # half with RST, half with FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    seen = [await _left_events(c, n) for c in (w1, w2, other)]
    assert sorted(seen[0]) == sorted(f"m{i}" for i in range(n))  # each once
    assert seen[0] == seen[1] == seen[2]  # one order for everyone
    # The room's next event comes after all of them, and the list agrees.
    sent = await other.ok("msg.send", room="crowd", text="still here?")
    for c in (w1, w2):
        assert (await c.event("message"))["id"] == sent["message"]["id"]
        await c.no_frame(0.05)
    members_now = await w1.ok("room.members", room="crowd")
    assert members_now["members"] == ["other", "watcher"]
