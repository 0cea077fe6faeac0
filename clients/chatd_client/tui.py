"""chatd-cli: a terminal chat client on prompt_toolkit.

A full-screen layout keeps the scrollback and the input line apart, so incoming messages
never break the line being typed. Everything it does goes through the library; the UI is
a ``ChatUI`` object that takes its ``input``/``output``, so tests drive it with
``create_pipe_input()`` and ``DummyOutput()``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import math
import os
import sys
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from typing import Any, ClassVar

from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.document import Document
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import HSplit, Layout, Window
from prompt_toolkit.layout.controls import FormattedTextControl
from prompt_toolkit.output import Output
from prompt_toolkit.widgets import TextArea

from chatd.protocol.models import Message
from chatd.tls import TLSSetupError, client_context
from chatd_client.client import AUTH_FAILED, Client, connect
from chatd_client.errors import ClientError, NotFound, RateLimited, ServerError, SessionEnded
from chatd_client.types import DISCONNECTED, EPOCH_CHANGED, RECONNECTED, REJOIN_FAILED, Event

HELP = """\
commands:
  /join ROOM            join (creating it if it does not exist) and make it current
  /leave [ROOM]         leave the current room (or ROOM)
  /msg USER TEXT        a direct message
  /rooms                list rooms
  /who [ROOM]           who is in the current room (or ROOM)
  /history [N]          the last N messages of the current room (default 20)
  /edit ID TEXT         edit a message (ids are shown in [brackets])
  /delete ID            delete a message
  /quit                 leave the program (also Ctrl-D); a guest logs out, freeing its name
  /help                 this text
anything else is sent to the current room; PageUp/PageDown scroll.
A line typed while disconnected is shown as "[queued] …" and sent after the reconnect."""


def format_message(m: Message) -> str:
    where = f"#{m.room}" if m.room else f"@{m.to}"
    clock = m.ts[11:19]
    edited = " (edited)" if m.edited_ts else ""
    return f"{clock} [{m.id}] {where} <{m.from_}> {m.text}{edited}"


class ChatUI:
    """The chat screen: scrollback above, status line, input line below."""

    def __init__(
        self,
        chat: Client,
        *,
        input: Input | None = None,
        output: Output | None = None,
        max_lines: int = 5000,
    ) -> None:
        self.chat = chat
        self.current: str | None = None
        self.max_lines = max_lines
        self._lines: list[str] = []
        self.updated = asyncio.Event()  # set whenever a line is added (tests wait on it)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.unsent: list[str] = []  # typed lines not yet confirmed, in typing order
        self.ended: SessionEnded | None = None  # the server refused the session
        self.scrollback = TextArea(read_only=True, focusable=False, scrollbar=True, wrap_lines=True)
        self.entry = TextArea(height=1, prompt="> ", multiline=False, accept_handler=self._accept)
        status = Window(FormattedTextControl(self._status), height=1, style="reverse")
        kb = KeyBindings()

        @kb.add("c-c")
        @kb.add("c-d")
        def _quit(event: KeyPressEvent) -> None:
            event.app.exit()

        @kb.add("pageup")
        def _up(event: KeyPressEvent) -> None:
            self._scroll(-10)

        @kb.add("pagedown")
        def _down(event: KeyPressEvent) -> None:
            self._scroll(10)

        self.app: Application[None] = Application(
            layout=Layout(
                HSplit([self.scrollback, status, self.entry]), focused_element=self.entry
            ),
            key_bindings=kb,
            full_screen=True,
            input=input,
            output=output,
        )

    # --- output ------------------------------------------------------------------------

    @property
    def text(self) -> str:
        return "\n".join(self._lines)

    def show(self, line: str) -> None:
        self._lines.extend(line.splitlines() or [""])
        del self._lines[: -self.max_lines]
        text = self.text
        self.scrollback.buffer.set_document(Document(text, len(text)), bypass_readonly=True)
        self.updated.set()
        self.app.invalidate()

    def _scroll(self, lines: int) -> None:
        buf = self.scrollback.buffer
        if lines < 0:
            buf.cursor_up(-lines)
        else:
            buf.cursor_down(lines)

    def _status(self) -> str:
        state = "connected" if self.chat.connected else "reconnecting…"
        where = self.current or "no room (/join ROOM)"
        return f" {self.chat.user or '-'} | {where} | {state} | /help"

    def describe(self, ev: Event) -> str | None:
        d = ev.data
        if ev.message is not None:
            m = ev.message
            if ev.name == "message.deleted":
                return f"* message [{m.id}] was deleted"
            prefix = "* edited: " if ev.name == "message.edited" else ""
            return prefix + format_message(m)
        name = ev.name
        if name == "member.joined":
            return f"* {d['user']} joined #{d['room']}"
        if name == "member.left":
            return f"* {d['user']} left #{d['room']} ({d.get('reason', 'left')})"
        if name == "room.updated":
            return f"* #{d['name']} topic: {d.get('topic', '')}"
        if name == "room.closed":
            if self.current and self.current.lower() == str(d["room"]).lower():
                self.current = None
            return f"* #{d['room']} was closed by {d.get('by')}"
        if name == DISCONNECTED:
            return f"*** disconnected ({d.get('reason')}); reconnecting…"
        if name == RECONNECTED:
            return "*** reconnected"
        if name == EPOCH_CHANGED:
            return "*** the server's store was replaced: history before this point is gone"
        if name == REJOIN_FAILED:
            return f"*** could not re-join #{d['room']}: {d['message']}"
        if name == AUTH_FAILED:
            return f"*** could not log in again: {d['message']}"
        if name == "server.shutdown":
            return f"*** server shutting down: {d.get('reason')}"
        if name in ("session.expiring", "session.expired"):
            return f"*** {name.replace('.', ' ')}"
        return None

    async def _pump(self) -> None:
        try:
            async for ev in self.chat.events():
                line = self.describe(ev)
                if line is not None:
                    self.show(line)
        except SessionEnded as exc:
            # Never carry on as someone else: say why and leave (run() raises it).
            self.ended = exc
            self.show(f"*** {exc}")
            self._exit()

    def _exit(self) -> None:
        if self.app.is_running and not self.app.future.done():  # type: ignore[union-attr]
            self.app.exit()

    # --- input -------------------------------------------------------------------------

    def _accept(self, buf: Buffer) -> bool:
        line = buf.text.strip()
        if line:
            self._spawn(self.handle(line))
        return False  # clear the input line

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle(self, line: str) -> None:
        """One line of input. Failures are shown, never raised."""
        try:
            await self._handle(line)
        except RateLimited as exc:
            self.show(f"! slow down (retry in {exc.retry_after}s)")
        except ServerError as exc:
            self.show(f"! {exc.code}: {exc.message}")
        except ClientError as exc:
            self.show(f"! {type(exc).__name__}: {exc}")

    async def _handle(self, line: str) -> None:
        if not line.startswith("/"):
            if self.current is None:
                self.show("! join a room first: /join ROOM")
                return
            await self._send(line, room=self.current)
            return
        cmd, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        handler = self._commands.get(cmd.lower())
        if handler is None:
            self.show(f"! unknown command /{cmd}; /help lists them")
            return
        await handler(self, rest)

    async def _join(self, rest: str) -> None:
        if not rest:
            self.show("! usage: /join ROOM")
            return

        try:
            res = await self.chat.join(rest)
            name, members = res.room.name, res.members
        except NotFound:
            info = await self.chat.room_create(rest)
            name, members = info.name, [self.chat.user or ""]
        self.current = name
        self.show(f"* joined #{name} ({', '.join(members)})")
        page = await self.chat.history(name, limit=20)
        for m in page.messages:
            self.show(format_message(m))

    async def _leave(self, rest: str) -> None:
        room = rest or self.current
        if room is None:
            self.show("! usage: /leave ROOM")
            return
        await self.chat.leave(room)
        self.show(f"* left #{room}")
        if self.current and self.current.lower() == room.lower():
            rooms = self.chat.rooms
            self.current = rooms[0] if rooms else None

    async def _msg(self, rest: str) -> None:
        user, _, text = rest.partition(" ")
        if not user or not text.strip():
            self.show("! usage: /msg USER TEXT")
            return
        await self._send(text.strip(), to=user)

    async def _send(self, text: str, *, room: str | None = None, to: str | None = None) -> None:
        """Send, waiting out an outage until /quit (the nonce makes the retry safe). A line
        typed while disconnected is shown as queued; the message itself shows when the
        server confirms it (its event). Unsent lines are printed when the program ends."""
        self.unsent.append(text)
        if not self.chat.connected:
            self.show(f"[queued] {text}" if room else f"[queued] @{to} {text}")
        try:
            await self.chat.send(text, room=room, to=to, timeout=math.inf)
        except ClientError:
            self.unsent.remove(text)
            self.show(f"! not sent: {text}")  # handle() shows why
            raise
        self.unsent.remove(text)

    async def _rooms(self, rest: str) -> None:
        rooms = await self.chat.room_list()
        if not rooms:
            self.show("* no rooms yet; /join ROOM creates one")
        for r in rooms:
            topic = f" — {r.topic}" if r.topic else ""
            self.show(f"* #{r.name} ({r.members} online){topic}")

    async def _who(self, rest: str) -> None:
        room = rest or self.current
        if room is None:
            self.show("! usage: /who ROOM")
            return
        self.show(f"* in #{room}: {', '.join(await self.chat.members(room))}")

    async def _history(self, rest: str) -> None:
        if self.current is None:
            self.show("! join a room first")
            return
        n = int(rest) if rest.isdigit() else 20
        page = await self.chat.history(self.current, limit=max(1, n))
        for m in page.messages:
            self.show(format_message(m))

    async def _edit(self, rest: str) -> None:
        mid, _, text = rest.partition(" ")
        if not mid.isdigit() or not text.strip():
            self.show("! usage: /edit ID TEXT")
            return
        await self.chat.edit(int(mid), text.strip())

    async def _delete(self, rest: str) -> None:
        if not rest.isdigit():
            self.show("! usage: /delete ID")
            return
        await self.chat.delete(int(rest))

    async def _help(self, rest: str) -> None:
        self.show(HELP)

    async def _quit(self, rest: str) -> None:
        self._exit()

    _commands: ClassVar[dict[str, Callable[[ChatUI, str], Awaitable[None]]]] = {
        "join": _join,
        "leave": _leave,
        "msg": _msg,
        "rooms": _rooms,
        "who": _who,
        "history": _history,
        "edit": _edit,
        "delete": _delete,
        "help": _help,
        "quit": _quit,
    }

    # --- run ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Until /quit or Ctrl-D. The caller owns (and closes) the client. Lines still
        waiting to be sent are printed to stderr, never dropped in silence. Raises
        ``SessionEnded`` if the server refused the session."""
        self.show(f"connected as {self.chat.user or '-'}; /help lists commands")
        pump = asyncio.ensure_future(self._pump())
        try:
            await self.app.run_async()
        finally:
            pump.cancel()
            pending = [pump, *self._tasks]
            for t in self._tasks:
                t.cancel()
            await asyncio.wait(pending, timeout=1.0)
            for text in self.unsent:
                print(f"chatd-cli: not sent: {text}", file=sys.stderr)
        if self.ended is not None:
            raise self.ended


async def run(
    host: str,
    port: int,
    *,
    user: str | None,
    password: str | None,
    token: str | None,
    room: str | None = None,
    input: Input | None = None,
    output: Output | None = None,
    ssl: SSLContext | None = None,
) -> None:
    async with connect(host, port, user=user, password=password, token=token, ssl=ssl) as chat:
        ui = ChatUI(chat, input=input, output=output)
        if room:
            ui._spawn(ui.handle(f"/join {room}"))
        await ui.run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chatd-cli", description="terminal client for chatd")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7777)
    p.add_argument("--user", "-u", help="log in as USER (a guest without a password)")
    p.add_argument("--password", action="store_true", help="ask for a password")
    p.add_argument("--token", help="a token (default: $CHATD_TOKEN)")
    p.add_argument("--room", help="join this room at start")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    p.add_argument("--tls-ca", metavar="FILE",
                   help="trust the CA certificate(s) in FILE, e.g. a self-signed server's (implies --tls)")
    args = p.parse_args(argv)
    token = args.token or os.environ.get("CHATD_TOKEN") or None
    password = os.environ.get("CHATD_PASSWORD") or None
    if args.password and password is None:
        password = getpass.getpass(f"password for {args.user}: ")
    if token is None and args.user is None:
        p.error("give --user (and --password) or --token")
    try:
        ctx = client_context(args.tls_ca) if (args.tls or args.tls_ca) else None
    except TLSSetupError as exc:
        print(f"chatd-cli: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(
            run(
                args.host, args.port, user=args.user, password=password, token=token,
                room=args.room, ssl=ctx,
            )
        )
    except ClientError as exc:
        print(f"chatd-cli: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
