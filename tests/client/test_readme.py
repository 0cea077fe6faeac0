"""The README runs as written (issue 12): its links stay inside the repository, the venv is
put on PATH near the top, and its Python examples run against a real server."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from chatd_client import connect

from tests.client.util import FAST, T, collect_until
from tests.helpers import running_server

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "protocol.md", ROOT / "clients" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PATHLIKE = re.compile(r"`(\.\./[^`\s]+)`")


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_docs_link_only_to_files_in_the_repository() -> None:
    for doc in DOCS:
        text = doc.read_text()
        for target in LINK.findall(text) + PATHLIKE.findall(text):
            if "://" in target:
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name}: {target}"


def test_the_quick_start_puts_the_venv_on_path_before_any_other_command() -> None:
    text = (ROOT / "README.md").read_text()
    first_section_after = text.index("\n## ", text.index("## Quick start") + 1)
    assert ". .venv/bin/activate" in text[:first_section_after]
    assert text.index("## Clients") < text.index("## Durability") < text.index("## Benchmarks")


async def _run_example(code: str, port: int) -> asyncio.subprocess.Process:
    code = code.replace("7777", str(port))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_the_library_example_runs_as_written_twice() -> None:
    hello = next(b for b in _python_blocks() if "chat.send(" in b and "Bot(" not in b)
    async with running_server() as srv:
        for _ in range(2):  # the second run finds the account and the room there already
            proc = await _run_example(hello, srv.port)
            out, err = await asyncio.wait_for(proc.communicate(), 3 * T)
            assert proc.returncode == 0, err.decode()
            assert out.decode().splitlines()[-1] == "bob hello, lobby"


async def test_the_bot_example_shows_its_imports_and_answers() -> None:
    bot_code = next(b for b in _python_blocks() if "Bot(" in b)
    assert re.search(r"^from chatd_client import .*\bBot\b.*\bMessage\b", bot_code, re.M)
    async with running_server() as srv:
        async with connect("127.0.0.1", srv.port, user="ann", options=FAST) as ann:
            await ann.room_create("lobby")
            events = ann.events()
            proc = await _run_example(bot_code, srv.port)
            try:
                await collect_until(events, lambda e: e.name == "member.joined", within=3 * T)
                await ann.send("marco", room="lobby")
                got = await collect_until(
                    events, lambda e: e.message is not None and e.message.from_ != "ann"
                )
                assert got[-1].message is not None and got[-1].message.text == "echo: marco"
            finally:
                proc.kill()
                await asyncio.wait_for(proc.communicate(), T)
