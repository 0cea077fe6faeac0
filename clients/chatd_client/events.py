"""Event subscriptions: an async iterator over a bounded buffer (STYLE 11)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from chatd_client.errors import ClientClosed, SessionEnded
from chatd_client.types import EVENTS_DROPPED, Event

__all__ = ["EventStream"]


class EventStream:
    """An async iterator of events over a bounded buffer.

    Past ``max_events`` the oldest are dropped and an ``events.dropped`` notice with the
    count comes before the next event (never silent, never blocking the connection).
    Iteration ends when the client is closed.
    """

    def __init__(
        self,
        maxsize: int,
        rooms: frozenset[str] | None,
        *,
        closed_error: Callable[[], ClientClosed],
        unsubscribe: Callable[[EventStream], None],
    ) -> None:
        self._items: collections.deque[Event] = collections.deque()
        self._maxsize = maxsize
        self._rooms = rooms
        self._dropped = 0
        self._wake = asyncio.Event()
        self._closed = False
        self._closed_error = closed_error
        self._unsubscribe = unsubscribe

    def _put(self, ev: Event) -> None:
        if self._rooms is not None and not ev.is_client_notice:
            if ev.room is None or ev.room.lower() not in self._rooms:
                return
        if len(self._items) >= self._maxsize:
            self._items.popleft()
            self._dropped += 1
        self._items.append(ev)
        self._wake.set()

    def _end(self) -> None:
        self._closed = True
        self._wake.set()

    def close(self) -> None:
        """Stop receiving (a filtered stream unsubscribes)."""
        self._unsubscribe(self)
        self._end()

    def pending(self) -> int:
        return len(self._items)

    async def get(self, timeout: float | None = None) -> Event:
        """The next event. Raises ``TimeoutError`` after ``timeout``; ``ClientClosed``
        once the client is closed and the buffer is empty (``SessionEnded`` if the server
        refused the session)."""
        async with asyncio.timeout(timeout):
            while not self._items and not self._dropped:
                if self._closed:
                    raise self._closed_error()
                self._wake.clear()
                await self._wake.wait()
        if self._dropped:
            n, self._dropped = self._dropped, 0
            return Event(EVENTS_DROPPED, {"count": n})
        return self._items.popleft()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        """Iteration ends quietly after ``close()``; a refused session raises
        ``SessionEnded`` instead, so a bot does not exit as if all were well."""
        try:
            return await self.get()
        except SessionEnded:
            raise
        except ClientClosed:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
