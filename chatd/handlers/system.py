"""ping, help and stats (wire contract, "Commands" and "Decided for the next round")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatd.errors import NotFound
from chatd.protocol import commands as c
from chatd.protocol.replies import HelpReply, PingReply, StatsReply

if TYPE_CHECKING:
    from chatd.app import App
    from chatd.dispatch import Request

PONG = PingReply()


def ping(app: App, req: Request, cmd: c.Ping) -> PingReply:
    return PONG


def help_(app: App, req: Request, cmd: c.Help) -> HelpReply:
    if cmd.command is None:
        return app.help_data
    # [chatd] `help` with `command`: that command's entry alone, short enough to read in nc.
    for entry in app.help_data.commands:
        if entry.cmd == cmd.command:
            return HelpReply(commands=[entry])
    raise NotFound(f"no command {cmd.command!r}; send help for the list")


async def stats(app: App, req: Request, cmd: c.Stats) -> StatsReply:
    """Grant admin (checked by the dispatcher). Figures from chatd.stats (the same dict
    feeds /metrics); the stored message count is a read off the loop."""
    return StatsReply(**app.stats.report(app, await app.store.count_messages()))
