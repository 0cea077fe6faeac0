"""chatd as a real process, for the tests of its command line: run one to its end, or
serve until the test is done. Every wait has a timeout; a server still running at the end
is killed."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.helpers import TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
# The contract's listening line: HOST:PORT, an IPv6 host in brackets.
LISTEN = re.compile(rb"listening on (\d+\.\d+\.\d+\.\d+|\[[0-9a-fA-F:.]+\]):(\d+)")


def chatd_env(**extra: str) -> dict[str, str]:
    """This environment without CHATD_SECRET (tests say which secret they mean), with
    the checkout importable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "CHATD_SECRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


async def chatd_run(
    *args: str, stdin: str | None = None, cwd: Path | None = None, **env: str
) -> tuple[int, str, str]:
    """Run `python -m chatd ARGS` to its end: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatd", *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd or ROOT,
        env=chatd_env(**env),
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), 20
        )
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Served:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: list[bytes]) -> None:
        self.proc = proc
        self.port = port
        self.log = log  # every stderr line so far
        self.started_in = 0.0  # seconds from exec to the listening line


@asynccontextmanager
async def chatd_serving(*args: str, cwd: Path | None = None, **env: str) -> AsyncIterator[Served]:
    """`python -m chatd ARGS` until its listening line; its stderr kept in `.log`."""
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatd", *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd or ROOT,
        env=chatd_env(**env),
    )  # fmt: skip
    assert proc.stderr is not None and proc.stdout is not None
    stderr, stdout = proc.stderr, proc.stdout
    log: list[bytes] = []
    drain: asyncio.Task[None] | None = None
    try:
        port = 0
        deadline = began + 15
        while not port:
            line = await asyncio.wait_for(stderr.readline(), deadline - time.monotonic())
            assert line, f"chatd exited before listening: {b''.join(log)!r}"
            log.append(line)
            if m := LISTEN.search(line):
                port = int(m.group(2))

        async def keep_reading() -> None:
            while line := await stderr.readline():
                log.append(line)

        drain = asyncio.create_task(keep_reading())
        served = Served(proc, port, log)
        served.started_in = time.monotonic() - began
        yield served
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), TIMEOUT)
        if drain is not None:
            await asyncio.wait_for(drain, TIMEOUT)
        await asyncio.wait_for(stdout.read(), TIMEOUT)
