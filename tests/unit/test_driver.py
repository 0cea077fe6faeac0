"""The one command driver's contract (chatd.dispatch.Driver), tested as production runs
it: handlers started by Dispatcher.execute, the rest driven from done-callbacks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from chatd.dispatch import Dispatcher, Driver, Outcome, Pending, Request, Spec
from chatd.errors import NotFound
from chatd.protocol import commands as c
from chatd.store.deferred import Deferred
from tests.unit.fakes import Core, core

held: dict[str, Any] = {}


async def on_deferred(app: Any, req: Request, cmd: Any) -> Any:
    d: Deferred[str] = Deferred(asyncio.get_running_loop())
    held["d"] = d
    return {"got": await d}


async def on_future_then_yield(app: Any, req: Request, cmd: Any) -> Any:
    loop = asyncio.get_running_loop()
    value = await loop.run_in_executor(None, lambda: "from a thread")
    await asyncio.sleep(0)  # a bare yield: goes on next turn
    return {"got": value}


async def fails(app: Any, req: Request, cmd: Any) -> Any:
    await asyncio.sleep(0)
    raise NotFound("no such thing")


async def needs_a_task(app: Any, req: Request, cmd: Any) -> Any:
    await asyncio.sleep(0)
    async with asyncio.timeout(1):  # needs asyncio.current_task(): not allowed
        await asyncio.sleep(0)
    return {}


async def awaits_something_else(app: Any, req: Request, cmd: Any) -> Any:
    class Odd:
        def __await__(self) -> Any:
            yield "not a future"

    await Odd()


@pytest.fixture
def k() -> Iterator[Core]:
    with core() as k:
        yield k


def run(k: Core, handler: Any) -> Pending:
    d = Dispatcher(k.app, [Spec(c.Ping, handler, "ping", auth=False)])
    s, _ = k.session()
    pending = d.handle(s, b'{"cmd":"ping","id":1}')
    assert isinstance(pending, Pending)
    return pending


async def finish(driver: Driver, pending: Pending) -> Outcome:
    done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    driver.start(pending, lambda tag, outcome: done.set_result(outcome), None)
    assert pending in driver.running or done.done()
    return await asyncio.wait_for(done, 5)


def reply(o: Outcome) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(o.reply)
    return frame


async def test_a_store_deferred_resumes_the_handler_inside_set_result(k: Core) -> None:
    driver = Driver(asyncio.get_running_loop().call_soon)
    got: list[Outcome] = []
    pending = run(k, on_deferred)
    driver.start(pending, lambda tag, o: got.append(o), "tag")
    assert driver.running and not got
    held["d"].set_result("committed")
    # No loop turn in between: a group commit finishes every send in one callback.
    assert [reply(o)["data"] for o in got] == [{"got": "committed"}]
    assert not driver.running


async def test_asyncio_futures_and_bare_yields_are_awaitable(k: Core) -> None:
    driver = Driver(asyncio.get_running_loop().call_soon)
    out = await finish(driver, run(k, on_future_then_yield))
    assert reply(out)["data"] == {"got": "from a thread"}
    assert not driver.running


async def test_a_handler_error_is_its_reply(k: Core) -> None:
    driver = Driver(asyncio.get_running_loop().call_soon)
    assert reply(await finish(driver, run(k, fails)))["code"] == "not_found"


async def test_what_needs_a_task_of_its_own_is_answered_internal(
    k: Core, caplog: pytest.LogCaptureFixture
) -> None:
    driver = Driver(asyncio.get_running_loop().call_soon)
    with caplog.at_level("ERROR", "chatd"):
        assert reply(await finish(driver, run(k, needs_a_task)))["code"] == "internal"
        assert reply(await finish(driver, run(k, awaits_something_else)))["code"] == "internal"
    assert not driver.running


async def test_a_cancelled_wait_is_answered_then_propagates(k: Core) -> None:
    driver = Driver(asyncio.get_running_loop().call_soon)
    got: list[Outcome] = []
    pending = run(k, on_deferred)
    driver.start(pending, lambda tag, o: got.append(o), None)
    with pytest.raises(asyncio.CancelledError):
        held["d"].set_exception(asyncio.CancelledError())
    assert [reply(o)["code"] for o in got] == ["internal"]  # the client still gets a reply
    assert not driver.running
