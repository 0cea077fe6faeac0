from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from chatd.server import ChatServer
from tests.helpers import Client, running_server


@pytest.fixture
async def server() -> AsyncIterator[ChatServer]:
    async with running_server() as srv:
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
