"""The database's files are known by identity, not spelling (issue 13 items 1, 9, 12):
`chatd backup` never writes over the live database or its sidecars however the target is
spelled, a second server through a link is refused, a malformed database is one clear line
and exit 2, and what chatd creates is private (0600)."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from chatd.store.sqlite.dbfiles import is_part_of
from tests.helpers import SECRET, TIMEOUT, Client
from tests.process import chatd_run
from tests.wire.test_crash import serving
from tests.wire.test_durability import all_history, refused

pytestmark = pytest.mark.one_node("one process's SQLite files")

# Each spelling of "the live database or one of its files" an operator (or an attacker
# with a shell) could hand to `chatd backup`, as a function of the database's directory.
SPELLINGS: dict[str, Callable[[Path], str]] = {
    "its -wal file": lambda d: str(d / "live.db-wal"),
    "its -shm file": lambda d: str(d / "live.db-shm"),
    "its lock file": lambda d: str(d / "live.db.lock"),
    "its secret file": lambda d: str(d / "live.db.secret"),
    "a doubled leading slash": lambda d: "/" + str(d / "live.db"),
    "a dot-dot detour": lambda d: str(d / ".." / d.name / "live.db"),
    "a symlinked directory": lambda d: str(d.parent / f"{d.name}-link" / "live.db"),
    "a symlink to the file": lambda d: str(d / "alias.db"),
    "a hard link": lambda d: str(d / "hard.db"),
    "the -wal through a symlinked directory": lambda d: str(
        d.parent / f"{d.name}-link" / "live.db-wal"
    ),
}


def _links(d: Path) -> None:
    (d.parent / f"{d.name}-link").symlink_to(d, target_is_directory=True)
    (d / "alias.db").symlink_to(d / "live.db")
    os.link(d / "live.db", d / "hard.db")


@pytest.mark.parametrize("spelling", list(SPELLINGS))
async def test_backup_onto_the_live_database_under_any_spelling_is_refused(
    tmp_path: Path, spelling: str
) -> None:
    d = tmp_path / "data"
    d.mkdir()
    db = str(d / "live.db")
    async with serving(db) as srv:
        _links(d)
        c = await Client.connect(srv.port)
        await c.guest("ann")
        await c.ok("room.create", room="lobby")
        sent = [(await c.ok("msg.send", room="lobby", text=f"m{i}"))["message"] for i in range(20)]
        target = SPELLINGS[spelling](d)
        before = {p.name: p.stat().st_ino for p in d.iterdir() if not p.is_symlink()}
        rc, _, err = await chatd_run("backup", target, "--db", db)
        refused(rc, err)
        assert "is the database itself or one of its files" in err, err
        # Nothing was renamed over anything: every file keeps its inode.
        assert {p.name: p.stat().st_ino for p in d.iterdir() if not p.is_symlink()} == before
        # The server still writes to the file the next start reads.
        sent.append((await c.ok("msg.send", room="lobby", text="after"))["message"])
        await c.close()
        srv.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(srv.proc.wait(), TIMEOUT) == 0
    async with serving(db) as srv:
        c = await Client.connect(srv.port)
        await c.guest("bob")
        assert [m["id"] for m in await all_history(c, "lobby")] == [m["id"] for m in sent]
        await c.close()


def test_is_part_of_tells_other_files_apart(tmp_path: Path) -> None:
    db = tmp_path / "live.db"
    db.write_bytes(b"")
    assert is_part_of(str(db), str(db))
    assert is_part_of(str(db), str(tmp_path / "live.db-journal"))  # need not exist
    assert not is_part_of(str(db), str(tmp_path / "live.db.bak"))
    assert not is_part_of(str(db), str(tmp_path / "other.db"))
    assert not is_part_of(str(db), str(tmp_path / "sub" / "live.db"))


async def test_backup_to_another_file_still_works_and_is_private(tmp_path: Path) -> None:
    db = str(tmp_path / "live.db")
    copy = tmp_path / "copy.db"
    async with serving(db) as srv:
        c = await Client.connect(srv.port)
        await c.guest("ann")
        await c.ok("room.create", room="lobby")
        await c.ok("msg.send", room="lobby", text="hi")
        await c.close()
        rc, _, err = await chatd_run("backup", str(copy), "--db", db)
        assert rc == 0, err
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    # No temporary file is left beside the backup.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".copy.db")) == []


async def test_backup_into_a_directory_is_refused(tmp_path: Path) -> None:
    db = str(tmp_path / "live.db")
    async with serving(db):
        pass
    rc, _, err = await chatd_run("backup", str(tmp_path), "--db", db)
    refused(rc, err)
    assert "is a directory" in err, err


@pytest.mark.parametrize("link", ["symlink", "hard link"])
async def test_a_second_server_through_a_link_is_refused(tmp_path: Path, link: str) -> None:
    db = tmp_path / "one.db"
    other = tmp_path / "other.db"
    async with serving(str(db)):
        if link == "symlink":
            other.symlink_to(db)
        else:
            os.link(db, other)
        rc, _, err = await chatd_run("serve", "--db", str(other), "--port", "0", "--secret", SECRET)
        refused(rc, err)
        assert "in use by another chatd server" in err, err


async def test_database_and_its_files_are_created_private(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    async with serving(str(db)) as srv:
        c = await Client.connect(srv.port)
        await c.guest("ann")
        await c.close()
        for path in (db, Path(f"{db}-wal"), Path(f"{db}.lock")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


async def test_a_planted_lock_symlink_is_not_followed(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    Path(f"{db}.lock").symlink_to(victim)
    rc, _, err = await chatd_run("serve", "--db", str(db), "--port", "0", "--secret", SECRET)
    refused(rc, err)
    assert "lock file" in err, err
    assert victim.read_text() == "precious\n"


async def test_a_malformed_database_is_one_line_and_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "bad.db"
    async with serving(str(db)) as srv:
        c = await Client.connect(srv.port)
        await c.guest("ann")
        for i in range(30):
            await c.ok("room.create", room=f"room{i}", topic="t" * 200)
        await c.close()
        srv.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(srv.proc.wait(), TIMEOUT) == 0
    data = bytearray(db.read_bytes())
    assert len(data) > 3 * 4096, len(data)
    data[2 * 4096 :] = b"\x5a" * (len(data) - 2 * 4096)  # every page after the second
    db.write_bytes(bytes(data))
    Path(f"{db}.lock").unlink()
    rc, _, err = await chatd_run("serve", "--db", str(db), "--port", "0", "--secret", SECRET)
    refused(rc, err)
    assert len(err.strip().splitlines()) == 1, err
    assert "malformed" in err, err
    # A refused start leaves no lock file behind, and holds no lock: a second try says
    # the same, not "in use".
    assert not Path(f"{db}.lock").exists()
    rc, _, err = await chatd_run("serve", "--db", str(db), "--port", "0", "--secret", SECRET)
    refused(rc, err)
    assert "malformed" in err and "in use" not in err, err


# --- the offline commands are safe (issue 12, "Safe CLI") ------------------------------


@pytest.mark.parametrize(
    "command", [("user", "list"), ("user", "delete", "ann"), ("token", "ann"), ("backup", "out.db")]
)
async def test_read_commands_refuse_a_missing_database_and_create_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    rc, _, err = await chatd_run(*command, "--db", "typo.db", cwd=tmp_path, CHATD_SECRET=SECRET)
    refused(rc, err)
    assert len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


async def test_user_add_without_a_terminal_or_password_stdin_is_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    rc, _, err = await chatd_run("user", "add", "ann", "--db", "x.db", cwd=tmp_path)
    refused(rc, err)
    assert len(err.strip().splitlines()) == 1 and "--password-stdin" in err, err
    assert list(tmp_path.iterdir()) == []


async def test_user_add_creates_a_private_database(tmp_path: Path) -> None:
    rc, _, err = await chatd_run(
        "user", "add", "ann", "--password-stdin", "--db", "x.db", "--secret", SECRET,
        cwd=tmp_path, stdin="correct horse battery\n",
    )  # fmt: skip
    assert rc == 0, err
    assert stat.S_IMODE((tmp_path / "x.db").stat().st_mode) == 0o600


@pytest.mark.parametrize("kind", ["sqlite", "text"])
async def test_a_refused_start_leaves_nothing_beside_a_foreign_file(
    tmp_path: Path, kind: str
) -> None:
    foreign = tmp_path / "notes.db"
    if kind == "sqlite":
        import sqlite3

        con = sqlite3.connect(foreign)
        con.execute("CREATE TABLE notes (t TEXT)")
        con.commit()
        con.close()
    else:
        foreign.write_text("just some text, not a database\n" * 200)
    before = foreign.read_bytes()
    rc, _, err = await chatd_run("serve", "--db", str(foreign), "--port", "0")
    refused(rc, err)
    assert "not a chatd database" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.db"]
    assert foreign.read_bytes() == before
