from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from chatd.server import ChatServer
from tests.helpers import Client, fake_clock, running_server


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[ChatServer]:
    # @pytest.mark.fake_clock: its timers wait for tests.helpers.advance, not real time.
    clock = fake_clock() if request.node.get_closest_marker("fake_clock") else None
    async with running_server(clock=clock) as srv:
        yield srv


@pytest.fixture
async def connect(server: ChatServer) -> AsyncIterator[Callable[[], Awaitable[Client]]]:
    clients: list[Client] = []

    async def make() -> Client:
        c = await Client.connect(server.port)
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
