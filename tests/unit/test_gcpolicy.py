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
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
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
    now = [0.0]
    collector = Collector(1.0, 10.0, quiet=lambda: quiet[0], clock=lambda: now[0])
    collector.start()
    now[0] = 15.0  # a full pass is due, and not yet forced (at 20)
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


CLOSES = ["reset", "eof", "abort_in_flight", "logout_then_close"]


@pytest.mark.parametrize("how", CLOSES)
@pytest.mark.parametrize("loop_factory", ["asyncio", "uvloop"])
def test_closed_connections_leave_no_cyclic_garbage(
    gc_restored: None, loop_factory: str, how: str
) -> None:
    """Under uvloop too (what `chatd serve` runs): its transports refer to their protocol.
    However a connection goes: a reset, a clean EOF, an abort with commands still running,
    a logout then a close."""
    factory = asyncio.new_event_loop
    if loop_factory == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        found, kinds = runner.run(_garbage_of_closed_connections(40, how))
    assert found == 0, (found, kinds)  # each closed connection's objects would be here


async def _close(c: Client, how: str) -> None:
    if how == "reset":
        c.writer.transport.abort()
    elif how == "eof":
        c.writer.write_eof()  # the server answers nothing more and closes
    elif how == "abort_in_flight":
        await c.send_raw(b"".join(
            b'{"cmd":"msg.send","id":"%d","room":"big","text":"bye"}\n' % i for i in range(5)
        ))  # fmt: skip
        c.writer.transport.abort()
    else:
        await c.ok("logout")
        await c.close()


async def _garbage_of_closed_connections(n: int, how: str) -> tuple[int, list[str]]:
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
            await _close(c, how)
        for _ in range(200):
            if len(srv.connections) == 1 and not srv.chores:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert len(srv.connections) == 1
        for c in members:
            c.writer.transport.abort()  # (an EOF'd client's own side, closed by the server)
        # The idle heap keeps a closed session until its deadline; let it go now.
        srv.sweep_idle(srv.clock.now() + 10**9)
        gc.set_debug(gc.DEBUG_SAVEALL)
        found = gc.collect()
        kinds = sorted({type(o).__qualname__ for o in gc.garbage})
        gc.set_debug(0)
        gc.garbage.clear()
        await owner.close()
    return found, kinds


def test_churn_puts_a_full_pass_off_at_most_twice_the_interval(gc_restored: None) -> None:
    now = [1000.0]
    collector = Collector(1.0, 600.0, quiet=lambda: False, clock=lambda: now[0])  # never quiet
    collector.start()
    for t in (1.0, 599.0, 600.0, 1199.0):
        now[0] = 1000.0 + t
        collector.tick()
        assert collector.full_passes == 0, t  # waits for a quiet moment ...
    now[0] = 1000.0 + 1200.0
    collector.tick()
    assert collector.full_passes == 1  # ... but not forever (before: never)
    now[0] += 1199.0
    collector.tick()
    assert collector.full_passes == 1  # counted again from that pass


async def test_stop_ends_the_ticks(gc_restored: None) -> None:
    collector = Collector(0.1, 600.0, quiet=lambda: True)
    collector.start()
    collector.start_ticking()
    await asyncio.sleep(0.25)
    collector.stop()
    assert gc.get_freeze_count() == 0
    await asyncio.sleep(0.25)  # before: the next tick froze everything again
    assert gc.get_freeze_count() == 0


def test_objects_alive_in_flight_start_no_young_passes_until_the_threshold(
    gc_restored: None,
) -> None:
    """Commands in flight hold tracked objects for a store round trip: 10,000 of them
    alive at once cost CPython's default collector ~14 young passes that find nothing;
    under the policy none runs, and stop() gives the thresholds back."""
    before = gc.get_threshold()
    collector = Collector(1.0, 600.0, quiet=lambda: True)
    collector.start()
    passes: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            passes.append(info["generation"])

    gc.callbacks.append(count)
    try:
        in_flight = [[i] for i in range(10_000)]
    finally:
        gc.callbacks.remove(count)
    assert in_flight and passes == []
    collector.stop()
    assert gc.get_threshold() == before


def test_the_freeze_interval_has_a_floor(capsys: pytest.CaptureFixture[str]) -> None:
    from chatd.cli import build_parser

    with pytest.raises(ValueError):
        Collector(0.01, 600.0, quiet=lambda: True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--gc-freeze-interval", "0.01"])
    assert "at least 0.1 seconds" in capsys.readouterr().err
    for ok in ("0", "0.1", "5"):
        build_parser().parse_args(["serve", "--gc-freeze-interval", ok])
