"""A Future-like result that runs the command driver's callback at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")
log = logging.getLogger("chatd")


class Deferred(msgspec.Struct, Generic[T], eq=False):
    """The result of one queued write: awaitable like an asyncio.Future, but a callback
    added without a context (the server's command driver) runs at once when the batch is
    delivered, instead of one loop turn later. A group commit then finishes thousands of
    sends in one callback. Tasks (which always pass a context) are scheduled as asyncio
    does it, so awaiting one from ordinary asyncio code behaves as usual.

    Made as ``Deferred(loop)``. A msgspec Struct (never encoded; ``eq=False``: compared
    and hashed by identity, as a Future is): one is made per write, and a Struct is built
    in C, with no Python ``__init__`` frame. The command Driver (chatd.dispatch) appends
    to ``_callbacks`` and reads a done one's ``_exc`` and ``_value`` in place."""

    _loop: asyncio.AbstractEventLoop
    _callbacks: list[tuple[Callable[[Any], None], Any]] = []  # a new list each
    _done: bool = False
    _value: Any = None
    _exc: BaseException | None = None
    _asyncio_future_blocking: bool = False

    def __await__(self) -> Generator[Any, None, T]:
        if not self._done:
            self._asyncio_future_blocking = True
            yield self
        return self.result()

    __iter__ = __await__

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def cancel(self, msg: Any = None) -> bool:
        return False  # the write is queued: it happens whoever stopped waiting

    def result(self) -> T:
        if self._exc is not None:
            raise self._exc
        value: T = self._value
        return value

    def exception(self) -> BaseException | None:
        return self._exc

    def add_done_callback(self, fn: Callable[[Any], None], *, context: Any = None) -> None:
        if self._done:
            self._loop.call_soon(fn, self, context=context)
        else:
            self._callbacks.append((fn, context))

    def remove_done_callback(self, fn: Callable[[Any], None]) -> int:
        before = len(self._callbacks)
        self._callbacks = [(f, c) for f, c in self._callbacks if f != fn]
        return before - len(self._callbacks)

    def set_result(self, value: T) -> None:
        self._value = value
        self._fire()

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._fire()

    def _fire(self) -> None:
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        escaped: BaseException | None = None
        for fn, context in callbacks:
            if context is not None:
                self._loop.call_soon(fn, self, context=context)
                continue
            try:
                fn(self)
            except Exception:  # one command's failure must not stop the batch's others
                log.exception("a command failed while its write was delivered")
            except BaseException as exc:
                # CancelledError, KeyboardInterrupt, SystemExit: never swallowed (STYLE 8);
                # the rest of the batch is still told, then the first one goes on up.
                if escaped is None:
                    escaped = exc
        if escaped is not None:
            raise escaped
