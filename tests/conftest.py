from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

import tests.helpers
from chatd.server import ChatServer
from tests.helpers import Client, fake_clock, nodes_of, running_server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "one_node(reason): a wire test inherently about one process (its SQLite file, its "
        "crash, its subprocess): not run again in the two-node pass",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every wire test runs twice: on one node, and on two nodes sharing one Redis
    (tests/helpers.py TWO_NODES), unless it is marked one_node with a reason."""
    if "/tests/wire/" not in str(metafunc.definition.path).replace("\\", "/"):
        return
    marker = metafunc.definition.get_closest_marker("one_node")
    if marker is not None:
        assert marker.args and marker.args[0], "one_node needs a reason"
        return
    metafunc.fixturenames.append("topology")
    metafunc.parametrize("topology", ["one", "two"], indirect=True)


@pytest.fixture(autouse=True)
def _two_node_pass(request: pytest.FixtureRequest) -> Iterator[None]:
    """Before anything else, so every server the test starts (through the `server`
    fixture or running_server) belongs to its pass."""
    callspec = getattr(request.node, "callspec", None)
    tests.helpers.TWO_NODES = callspec is not None and callspec.params.get("topology") == "two"
    tests.helpers.REDIS_FOR_FILE.clear()
    try:
        yield
    finally:
        tests.helpers.TWO_NODES = False
        tests.helpers.REDIS_FOR_FILE.clear()


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> str:
    """The pass: "one" node, or "two" nodes on one Redis (tests/helpers.py)."""
    return str(request.param)


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[ChatServer]:
    # @pytest.mark.fake_clock: its timers wait for tests.helpers.advance, not real time.
    clock = fake_clock() if request.node.get_closest_marker("fake_clock") else None
    async with running_server(clock=clock) as srv:
        yield srv


@pytest.fixture
async def connect(server: ChatServer) -> AsyncIterator[Callable[[], Awaitable[Client]]]:
    clients: list[Client] = []
    ports = [node.port for node in nodes_of(server)]

    async def make() -> Client:
        # In the two-node pass, connections alternate between the nodes.
        c = await Client.connect(ports[len(clients) % len(ports)])
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()


@pytest.fixture
def redis_url() -> str:
    """A real redis-server's URL, emptied for this test (tests/redisutil.py; skipped with
    a reason when redis-server is missing, failed in CI)."""
    from tests.redisutil import fresh_redis_url

    return fresh_redis_url()
