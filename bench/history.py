"""History pages on a room with a million messages: the time of room.history with no
cursor, with `before` in the middle, with `after` in the middle, and of sync far back.

    python3 dev.py bench history [--messages 1000000]

The room is filled straight into a fresh database through the store's own schema
(a million sends over the wire would measure the send path, not history).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time

from bench.common import Server, new_loop, open_line, percentile, pin_self


def fill(db_path: str, n: int) -> None:
    from chatd.store.sqlite import migrate

    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    migrate(db)
    db.execute("BEGIN IMMEDIATE")
    db.execute(
        "INSERT INTO rooms (name, name_key, topic, owner, created_at, ephemeral, open) "
        "VALUES ('big', 'big', '', 'filler', ?, 0, 1)",
        (time.time(),),
    )
    now = time.time() - n
    rows = (
        (i, i, 1, "filler", "filler", f"message number {i} " + "x" * 60, now + i)
        for i in range(1, n + 1)
    )
    db.executemany(
        "INSERT INTO messages (id, rev, room_id, sender, sender_key, text, ts)"
        " VALUES (?,?,?,?,?,?,?)",
        rows,
    )
    db.execute("UPDATE meta SET value = ? WHERE key = 'rev'", (str(n),))
    db.execute("COMMIT")
    db.close()


async def run(port: int, n: int, repeat: int) -> dict[str, float]:
    c = await open_line(port)
    await c.call({"cmd": "login", "id": 1, "user": "reader"})
    await c.call({"cmd": "room.join", "id": 2, "room": "big"})
    out: dict[str, float] = {"messages_in_room": n}
    cases = {
        "newest_50_ms": {"limit": 50},
        "newest_500_ms": {"limit": 500},
        "before_middle_50_ms": {"before": n // 2, "limit": 50},
        "after_middle_50_ms": {"after": n // 2, "limit": 50},
        "between_ms": {"after": n // 3, "before": n // 3 + 40},
    }
    rid = 10
    for name, fields in cases.items():
        times = []
        for _ in range(repeat):
            rid += 1
            t = time.perf_counter()
            r = await c.call({"cmd": "room.history", "id": rid, "room": "big", **fields})
            times.append(time.perf_counter() - t)
            assert r["type"] == "ok", r
        out[name] = round(percentile(times, 0.5) * 1000, 2)
    times = []
    for _ in range(repeat):
        rid += 1
        t = time.perf_counter()
        r = await c.call({"cmd": "sync", "id": rid, "since": n - 500})
        times.append(time.perf_counter() - t)
        assert r["type"] == "ok", r
    out["sync_last_500_ms"] = round(percentile(times, 0.5) * 1000, 2)
    assert c.transport is not None
    c.transport.close()
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="chatd-history-")
    db = os.path.join(tmp, "big.db")
    t = time.monotonic()
    fill(db, args.messages)
    filled = time.monotonic() - t
    pin_self()
    with Server("--db", db) as srv:
        loop = new_loop()
        try:
            r = loop.run_until_complete(run(srv.port, args.messages, args.repeat))
        finally:
            loop.close()
    r["fill_seconds"] = round(filled, 1)
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
