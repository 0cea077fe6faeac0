"""`chatd serve` as a real process (wire contract, "Running"; limits.md, shutdown)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SECRET, TIMEOUT, Client, deaf_client
from tests.process import chatd_env, chatd_run, chatd_serving

pytestmark = pytest.mark.one_node("`chatd serve` processes of its own")

serve = chatd_serving
run = chatd_run


async def shutdown_then_eof(c: Client) -> dict[str, Any]:
    """Frames until `server.shutdown`, then nothing but EOF."""
    while True:
        frame = await c.recv()
        if frame.get("event") == "server.shutdown":
            break
    data: dict[str, Any] = frame["data"]
    rest = await asyncio.wait_for(c.reader.read(), TIMEOUT)
    assert rest == b"", rest
    return data


MEMORY = ("serve", "--db", ":memory:", "--port", "0")


async def test_serve_logs_one_listening_line_naming_host_and_port() -> None:
    async with serve(*MEMORY) as srv:
        assert srv.port > 0
        listening = [line for line in srv.log if b"listening" in line]
        assert len(listening) == 1
        assert f"127.0.0.1:{srv.port}".encode() in listening[0]
        c = await Client.connect(srv.port)
        assert c.hello["data"]["server"] == "chatd"
        assert (await c.ok("ping")) == {"pong": True}
        await c.close()
        srv.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(srv.proc.wait(), 5) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_sends_server_shutdown_to_every_client_then_exits_zero(sig: int) -> None:
    async with serve(*MEMORY, "--rate-limit", "0") as srv:
        a = await Client.connect(srv.port)
        await a.guest("ann")
        await a.ok("room.create", room="lobby")
        b = await Client.connect(srv.port)
        await b.guest("bob")
        await b.ok("room.join", room="lobby")
        idle = await Client.connect(srv.port)  # never logged in
        await a.ok("msg.send", room="lobby", text="before shutdown")
        start = time.monotonic()
        srv.proc.send_signal(sig)
        for c in (a, b, idle):
            data = await shutdown_then_eof(c)
            assert isinstance(data["reason"], str) and data["reason"]
        assert await asyncio.wait_for(srv.proc.wait(), 5) == 0
        assert time.monotonic() - start < 5
        for c in (a, b, idle):
            await c.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_shutdown_is_prompt_with_a_client_that_never_reads(sig: int) -> None:
    # A hard limit far away, so the deaf client is not dropped: its buffers just stay full.
    args = (*MEMORY, "--rate-limit", "0", "--outbox-hard", str(256 * 1024 * 1024))
    async with serve(*args) as srv:
        sender = await Client.connect(srv.port)
        await sender.guest("ann")
        await sender.ok("room.create", room="lobby")
        deaf = await deaf_client(srv.port)
        await deaf.guest("deaf")
        await deaf.ok("room.join", room="lobby")
        other = await Client.connect(srv.port)
        text = "x" * 4000
        for _ in range(2000):  # ~8 MB: more than the kernel buffers on both sides hold
            await sender.ok("msg.send", room="lobby", text=text)
        start = time.monotonic()
        srv.proc.send_signal(sig)
        await shutdown_then_eof(other)
        assert await asyncio.wait_for(srv.proc.wait(), 6) == 0
        assert time.monotonic() - start < 5

        # The deaf client finds its stream ended (cut short, or after the shutdown event).
        async def to_end() -> None:
            while True:
                try:
                    if not await deaf.reader.read(1 << 20):
                        return
                except ConnectionError:
                    return

        await asyncio.wait_for(to_end(), TIMEOUT)
        for c in (sender, deaf, other):
            await c.close()


@pytest.mark.parametrize("how", ["flag", "env"])
async def test_a_short_secret_is_refused_with_a_clear_message(how: str) -> None:
    short = "x" * 31
    if how == "flag":
        rc, _out, err = await run(*MEMORY, "--secret", short)
    else:
        rc, _out, err = await run(*MEMORY, CHATD_SECRET=short)
    assert rc != 0
    assert "32 bytes" in err and "secret" in err
    assert "Traceback" not in err
    assert "listening" not in err


async def test_a_long_enough_secret_is_accepted() -> None:
    async with serve(*MEMORY, "--secret", SECRET) as srv:
        srv.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(srv.proc.wait(), 5) == 0


async def test_chatd_with_only_flags_is_serve() -> None:
    async with serve("--db", ":memory:", "--port", "0") as srv:
        c = await Client.connect(srv.port)
        assert c.hello["event"] == "hello"
        await c.close()
        srv.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(srv.proc.wait(), 5) == 0


async def test_chatd_alone_is_serve_with_defaults(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatd",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=chatd_env(),
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        line = b""
        while b"listening" not in line and b"cannot listen" not in line:
            line = await asyncio.wait_for(proc.stderr.readline(), 15)
            assert line, "chatd exited without serving"
        # Either it serves on the default address, or that port is taken here: both are serve.
        assert b"127.0.0.1:7777" in line
        if b"listening" in line:
            assert (tmp_path / "chatd.db").exists()
            secret_file = tmp_path / "chatd.db.secret"
            assert secret_file.stat().st_mode & 0o777 == 0o600
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.communicate(), TIMEOUT)


async def test_help_names_serve() -> None:
    rc, out, _ = await run("--help")
    assert rc == 0 and "serve" in out
    rc, out, _ = await run("serve", "--help")
    assert rc == 0 and "--port" in out and "--outbox-hard" in out and "--idle-timeout" in out
