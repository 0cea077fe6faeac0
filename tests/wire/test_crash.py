"""A real `chatd serve` process killed with SIGKILL in the middle of a send storm, several
times on the same database (README "Durability"): what was acknowledged is never lost,
nothing shows up half-written, and ids keep growing across restarts."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
from contextlib import AbstractAsyncContextManager, suppress
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SECRET, TIMEOUT, Client
from tests.process import Served, chatd_serving

pytestmark = pytest.mark.one_node("a crash of one process and its SQLite file")

STORM = ("--rate-limit", "0", "--command-rate", "0")
CLIENTS = 20
ROUNDS = 4
WINDOW = 64  # sends in flight per client
ROOM = "storm"


def serving(db: str, *extra: str) -> AbstractAsyncContextManager[Served]:
    """`chatd serve --db DB --port 0` with the test secret, until its listening line."""
    return chatd_serving("serve", "--db", db, "--port", "0", "--secret", SECRET, *extra)


class Sender:
    """One client pipelining msg.send into the room; a send counts as acknowledged only
    when its whole `ok` line has arrived."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.texts: list[str] = []  # by sequence number (= request id)
        self.acked: list[tuple[int, int, str]] = []  # (seq, message id, text)
        self.errors: list[dict[str, Any]] = []
        self.top_rev = 0
        self.client: Client | None = None

    async def login(self, port: int) -> None:
        self.client = await Client.connect(port)
        await self.client.guest(self.name)

    async def storm(self) -> None:
        c = self.client
        assert c is not None
        window = asyncio.Semaphore(WINDOW)
        token = c.token

        async def write() -> None:
            seq = 0
            while True:
                await window.acquire()
                text = f"{self.name}-{seq}"
                self.texts.append(text)
                frame = {"cmd": "msg.send", "id": seq, "room": ROOM, "text": text, "token": token}
                c.writer.write(json.dumps(frame).encode() + b"\n")
                seq += 1
                if seq % 16 == 0:
                    await c.writer.drain()

        writer = asyncio.create_task(write())
        try:
            while True:
                try:
                    line = await c.reader.readline()
                except ConnectionError:
                    return
                if not line.endswith(b"\n"):
                    return  # EOF, or a reply cut short by the kill: not acknowledged
                frame = json.loads(line)
                if frame["type"] == "ok":
                    m = frame["data"]["message"]
                    self.acked.append((frame["id"], m["id"], m["text"]))
                    self.top_rev = max(self.top_rev, m["rev"])
                    window.release()
                elif frame["type"] == "error":
                    self.errors.append(frame)
                    window.release()
        finally:
            writer.cancel()
            with suppress(asyncio.CancelledError, ConnectionError):
                await writer
            c.writer.close()


async def whole_history(port: int, who: str) -> list[dict[str, Any]]:
    c = await Client.connect(port)
    await c.guest(who)
    messages: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await c.ok("room.history", room=ROOM, after=after, limit=500)
        messages += page["messages"]
        if not page["more"]:
            break
        after = messages[-1]["id"]
    await c.close()
    return messages


def check_history(history: list[dict[str, Any]], senders: list[Sender]) -> None:
    """Every acknowledged message is there, same id and text, in order; everything there
    is a whole message some client sent; each client's committed sends are a prefix of
    what it sent (one writer, first in first out)."""
    ids = [m["id"] for m in history]
    assert ids == sorted(set(ids)), "history ids are not strictly increasing"
    by_id = {m["id"]: m for m in history}
    owners = {s.name: s for s in senders}
    seen: dict[str, list[int]] = {s.name: [] for s in senders}
    for m in history:
        sender = owners.get(m["from"])
        assert sender is not None, f"a message nobody sent: {m}"
        name, _, seq = m["text"].rpartition("-")
        assert name == sender.name and seq.isdigit(), f"not a whole text: {m}"
        assert int(seq) < len(sender.texts) and sender.texts[int(seq)] == m["text"], m
        assert m["deleted"] is False and m["room"] == ROOM
        seen[sender.name].append(int(seq))
    for s in senders:
        assert seen[s.name] == list(range(len(seen[s.name]))), f"{s.name}: not a prefix"
        assert [seq for seq, _, _ in s.acked] == list(range(len(s.acked)))
        assert len(seen[s.name]) >= len(s.acked), f"{s.name}: acknowledged sends lost"
        for _, mid, text in s.acked:
            assert mid in by_id, f"acknowledged message {mid} ({text}) lost"
            assert by_id[mid]["text"] == text
        assert not s.errors, s.errors[:3]


async def test_acknowledged_sends_survive_repeated_sigkill_mid_storm(tmp_path: Path) -> None:
    db = str(tmp_path / "crash.db")
    rng = random.Random()
    senders: list[Sender] = []
    top_id = 0  # the highest id any server has shown so far
    top_rev = 0
    async with serving(db, *STORM) as srv:
        owner = await Client.connect(srv.port)
        await owner.guest("owner")
        await owner.ok("room.create", room=ROOM, open=True)
        await owner.close()
        srv.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(srv.proc.wait(), TIMEOUT) == 0
    for rnd in range(ROUNDS + 1):
        async with serving(db, *STORM) as srv:
            assert srv.started_in < 5, f"start took {srv.started_in:.1f} s"
            history = await whole_history(srv.port, f"check{rnd}")
            check_history(history, senders)
            if history:
                assert history[-1]["id"] >= top_id
                top_id = history[-1]["id"]
            probe = await Client.connect(srv.port)
            rev = probe.hello["data"]["rev"]
            assert rev >= top_rev, "the revision went backwards across a restart"
            top_rev = rev
            await probe.close()
            if rnd == ROUNDS:
                srv.proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(srv.proc.wait(), TIMEOUT) == 0
                break
            fresh = [Sender(f"r{rnd}c{i}") for i in range(CLIENTS)]
            await asyncio.wait_for(asyncio.gather(*(s.login(srv.port) for s in fresh)), TIMEOUT)
            storms = [asyncio.create_task(s.storm()) for s in fresh]
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            srv.proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*storms), TIMEOUT)
            assert srv.log and not any(b"Traceback" in line for line in srv.log), srv.log
            acked = [mid for s in fresh for _, mid, _ in s.acked]
            assert len(acked) > CLIENTS, "the storm never got going"
            assert min(acked) > top_id, "ids did not keep growing across the restart"
            top_rev = max(top_rev, *(s.top_rev for s in fresh))
            senders += fresh
    # The file itself is sound after all that.
    db_conn = sqlite3.connect(db)
    try:
        assert db_conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db_conn.close()
