"""chatd.gcpolicy (issue 13, item 2): long-lived objects are frozen out of the cyclic GC's
full passes, which is only safe because a closed connection leaves no reference cycle
behind (reference counting frees it even while frozen)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from chatd.gcpolicy import Collector
from tests.helpers import Client, running_server


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """The collector is process-wide: each test leaves it as it found it."""
    enabled = gc.isenabled()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()


def test_importing_chatd_leaves_the_collector_alone() -> None:
    import subprocess
    import sys

    code = (
        "import gc; import chatd.cli, chatd.server, chatd.gcpolicy; "
        "print(gc.get_freeze_count(), gc.get_threshold(), gc.isenabled())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split(maxsplit=1)  # fmt: skip
    assert out[0] == "0" and out[1].strip() == f"{gc.get_threshold()} True", out


def test_ticks_freeze_survivors_and_a_quiet_full_pass_unfreezes_first(gc_restored: None) -> None:
    quiet = [False]
    collector = Collector(1.0, 0.0, quiet=lambda: quiet[0])
    collector.start()
    assert gc.get_freeze_count() > 0
    kept = [object() for _ in range(10)], {"a": [1]}  # young, alive: frozen at the next tick
    before = gc.get_freeze_count()
    collector.tick()
    assert gc.get_freeze_count() > before and collector.full_passes == 0  # not quiet
    cycle: list[object] = []
    cycle.append(cycle)
    collector.tick()  # frozen while alive ...
    del cycle  # ... and now garbage: only a full pass over everything finds it
    gc.set_debug(gc.DEBUG_SAVEALL)
    quiet[0] = True
    collector.tick()
    assert collector.full_passes == 1
    assert any(type(o) is list and len(o) == 1 and o[0] is o for o in gc.garbage)
    assert kept


@pytest.mark.parametrize("loop_factory", ["asyncio", "uvloop"])
def test_closed_connections_leave_no_cyclic_garbage(gc_restored: None, loop_factory: str) -> None:
    """Under uvloop too (what `chatd serve` runs): its transports refer to their protocol."""
    factory = asyncio.new_event_loop
    if loop_factory == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        found, kinds = runner.run(_garbage_of_closed_connections(40))
    assert found < 40, (found, kinds)  # each closed connection's objects would be here


async def _garbage_of_closed_connections(n: int) -> tuple[int, list[str]]:
    gc.collect()
    gc.disable()  # cycles would pile up, to be counted below
    async with running_server(per_ip_connections=0, guest_logins_per_ip=0) as srv:
        owner = await Client.connect(srv.port)
        await owner.guest("owner")
        await owner.ok("room.create", room="big")
        members = [await Client.connect(srv.port) for _ in range(n)]
        for i, c in enumerate(members):
            await c.guest(f"m{i}")
            await c.ok("room.join", room="big")
        gc.collect()
        for c in members:
            c.writer.transport.abort()
        for _ in range(200):
            if len(srv.connections) == 1 and not srv.chores:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert len(srv.connections) == 1
        # The idle heap keeps a closed session until its deadline; let it go now.
        srv.sweep_idle(srv.clock.now() + 10**9)
        gc.set_debug(gc.DEBUG_SAVEALL)
        found = gc.collect()
        kinds = sorted({type(o).__qualname__ for o in gc.garbage})
        gc.set_debug(0)
        gc.garbage.clear()
        await owner.close()
    return found, kinds
