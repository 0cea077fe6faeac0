"""The terminal client driven by pipe input, and the example bots against a server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from chatd_client import connect
from chatd_client.examples import echo_bot, moderation_bot
from chatd_client.tui import ChatUI
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from tests.client.util import FAST, T, collect_until, next_event
from tests.helpers import running_server

ROOT = Path(__file__).resolve().parents[2]


async def wait_text(ui: ChatUI, needle: str, within: float = T) -> None:
    async with asyncio.timeout(within):
        while needle not in ui.text:
            ui.updated.clear()
            await ui.updated.wait()


async def test_terminal_client_joins_sends_and_sees_messages() -> None:
    async with running_server() as srv:
        with create_pipe_input() as pipe:
            async with (
                connect("127.0.0.1", srv.port, user="tui", options=FAST) as chat,
                connect("127.0.0.1", srv.port, user="bob", options=FAST) as bob,
            ):
                ui = ChatUI(chat, input=pipe, output=DummyOutput())
                task = asyncio.ensure_future(ui.run())
                pipe.send_text("/join lobby\r")
                await wait_text(ui, "* joined #lobby")
                pipe.send_text("hello from the terminal\r")
                await wait_text(ui, "#lobby <tui> hello from the terminal")
                await bob.join("lobby")
                await wait_text(ui, "* bob joined #lobby")
                m = await bob.send("hi tui", room="lobby")
                await wait_text(ui, f"[{m.id}] #lobby <bob> hi tui")
                pipe.send_text("/who\r")
                await wait_text(ui, "* in #lobby: ")
                pipe.send_text("/rooms\r")
                await wait_text(ui, "* #lobby (2 online)")
                pipe.send_text("/msg bob psst\r")
                dm = await next_event(bob.events(), "message")
                while dm.message is None or dm.message.to is None:
                    dm = await next_event(bob.events(), "message")
                assert dm.message.text == "psst" and dm.message.from_ == "tui"
                own = (await chat.history("lobby")).messages[0]
                pipe.send_text(f"/edit {own.id} edited text\r")
                await wait_text(ui, "* edited: ")
                pipe.send_text(f"/delete {own.id}\r")
                await wait_text(ui, f"* message [{own.id}] was deleted")
                pipe.send_text("/nonsense\r")
                await wait_text(ui, "! unknown command /nonsense")
                pipe.send_text("/help\r")
                await wait_text(ui, "/history [N]")
                pipe.send_text("/quit\r")
                await asyncio.wait_for(task, T)


async def test_echo_bot_answers_others_but_not_itself() -> None:
    async with running_server() as srv:
        async with connect("127.0.0.1", srv.port, user="ann", options=FAST) as ann:
            await ann.room_create("lobby")
            bot = asyncio.ensure_future(echo_bot.run("127.0.0.1", srv.port, "lobby", "echo"))
            try:
                events = ann.events()
                await next_event(events, "member.joined")
                await ann.send("marco", room="lobby")
                got = await collect_until(
                    events, lambda e: e.message is not None and e.message.from_ == "echo"
                )
                assert got[-1].message is not None and got[-1].message.text == "echo: marco"
                await ann.send("polo", room="lobby")
                got = await collect_until(
                    events, lambda e: e.message is not None and e.message.text == "echo: polo"
                )
                # exactly one echo per message: the bot ignored its own "echo: marco"
                history = [m.text for m in (await ann.history("lobby")).messages]
                assert history == ["marco", "echo: marco", "polo", "echo: polo"]
            finally:
                bot.cancel()
                await asyncio.wait([bot], timeout=T)


async def test_moderation_bot_deletes_banned_words() -> None:
    async with running_server() as srv:
        async with connect("127.0.0.1", srv.port, options=FAST) as setup:
            await setup.register("mod", "password1")
        async with connect("127.0.0.1", srv.port, user="ann", options=FAST) as ann:
            await ann.room_create("lobby")
            bot = asyncio.ensure_future(
                moderation_bot.run("127.0.0.1", srv.port, ["lobby"], "mod", "password1", ["spam"])
            )
            try:
                events = ann.events()
                await next_event(events, "member.joined")
                bad = await ann.send("buy SPAM now", room="lobby")
                good = await ann.send("nice weather", room="lobby")
                gone = await next_event(events, "message.deleted")
                assert gone.message is not None and gone.message.id == bad.id
                assert gone.data["by"] == "mod"
                assert [m.id for m in (await ann.history("lobby")).messages] == [good.id]
            finally:
                bot.cancel()
                await asyncio.wait([bot], timeout=T)


async def test_raw_socket_bot_speaks_the_wire_format_with_the_stdlib_alone() -> None:
    script = ROOT / "clients" / "examples" / "raw_socket_bot.py"
    async with running_server() as srv:
        async with connect("127.0.0.1", srv.port, user="ann", options=FAST) as ann:
            await ann.room_create("lobby")
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                str(script),
                "--port",
                str(srv.port),
                "--room",
                "lobby",
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                assert proc.stdout is not None
                first = await asyncio.wait_for(proc.stdout.readline(), T)
                assert first.startswith(b"server ")
                assert await asyncio.wait_for(proc.stdout.readline(), T) == b"joined lobby\n"
                events = ann.events()
                await ann.send("!ping", room="lobby")
                got = await collect_until(
                    events, lambda e: e.message is not None and e.message.from_ == "rawbot"
                )
                assert got[-1].message is not None and got[-1].message.text == "pong"
            finally:
                proc.kill()
                await asyncio.wait_for(proc.wait(), T)
