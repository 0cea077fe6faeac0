"""The two-node pass itself (tests/conftest.py): in it, `server` is the first of two
nodes on one Redis and `connect` alternates between them, so every wire test there runs
across nodes. The nodes share only Redis (their own ChatServer, RedisStore and bus)."""

from __future__ import annotations

from chatd.server import ChatServer
from tests.helpers import Connect, guest, nodes_of


async def test_the_two_node_pass_runs_two_nodes(
    server: ChatServer, connect: Connect, topology: str
) -> None:
    nodes = nodes_of(server)
    assert len(nodes) == (2 if topology == "two" else 1)
    assert len({n.port for n in nodes}) == len(nodes)
    assert len({id(n.store) for n in nodes}) == len({id(n.app.bus) for n in nodes}) == len(nodes)
    a = await guest(connect, "ann")
    b = await guest(connect, "bob")
    assert a.writer.get_extra_info("peername")[1] == nodes[0].port
    assert b.writer.get_extra_info("peername")[1] == nodes[-1].port
    await a.ok("room.create", room="dev")
    await b.ok("room.join", room="dev")
    assert (await a.event("member.joined")) == {"room": "dev", "user": "bob"}
    sent = (await b.ok("msg.send", room="dev", text="hi"))["message"]
    assert (await a.event("message")) == sent
