"""The store's eager result object behaves like a Future for asyncio code, and runs the
command driver's callback at once (chatd.store.deferred.Deferred)."""

from __future__ import annotations

import asyncio

import pytest

from chatd.store.deferred import Deferred


async def test_awaiting_from_a_task_gets_the_value() -> None:
    d: Deferred[int] = Deferred(asyncio.get_running_loop())

    async def waiter() -> int:
        return await d

    task = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)
    d.set_result(7)
    assert await asyncio.wait_for(task, 1) == 7


async def test_awaiting_from_a_task_gets_the_exception() -> None:
    d: Deferred[int] = Deferred(asyncio.get_running_loop())
    task = asyncio.ensure_future(_await(d))
    await asyncio.sleep(0)
    d.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        await asyncio.wait_for(task, 1)


async def _await(d: Deferred[int]) -> int:
    return await d


async def test_a_callback_without_context_runs_at_once_and_errors_are_contained() -> None:
    d: Deferred[int] = Deferred(asyncio.get_running_loop())
    seen: list[int] = []

    def bad(_: object) -> None:
        raise RuntimeError("a failing command")

    d.add_done_callback(bad)
    d.add_done_callback(lambda fut: seen.append(fut.result()))
    d.set_result(3)
    assert seen == [3]  # ran inside set_result, despite the first callback failing
    assert d.done() and not d.cancelled() and d.exception() is None


async def test_a_finished_result_is_returned_without_waiting() -> None:
    d: Deferred[str] = Deferred(asyncio.get_running_loop())
    d.set_result("done")
    assert await d == "done"


async def test_a_cancellation_from_a_callback_is_not_swallowed_and_the_batch_still_runs() -> None:
    d: Deferred[int] = Deferred(asyncio.get_running_loop())
    seen: list[int] = []

    def cancelled(_: object) -> None:
        raise asyncio.CancelledError

    d.add_done_callback(cancelled)
    d.add_done_callback(lambda fut: seen.append(fut.result()))
    with pytest.raises(asyncio.CancelledError):
        d.set_result(5)
    assert seen == [5]  # every other waiter of the batch was still told
