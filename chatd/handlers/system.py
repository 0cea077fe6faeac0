"""ping, help and stats (wire contract, "Commands" and "Decided for the next round")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chatd.errors import NotFound
from chatd.protocol import commands as c

if TYPE_CHECKING:
    from chatd.app import App
    from chatd.dispatch import Request

PONG = {"pong": True}


def ping(app: App, req: Request, cmd: c.Ping) -> Any:
    return PONG


def help_(app: App, req: Request, cmd: c.Help) -> Any:
    if cmd.command is None:
        return app.help_data
    # [chatd] `help` with `command`: that command's entry alone, short enough to read in nc.
    for entry in app.help_data["commands"]:
        if entry["cmd"] == cmd.command:
            return {"commands": [entry]}
    raise NotFound(f"no command {cmd.command!r}; send help for the list")


async def stats(app: App, req: Request, cmd: c.Stats) -> Any:
    """Grant admin (checked by the dispatcher). Figures from chatd.stats; the stored
    message count is a read off the loop."""
    return app.stats.report(app, await app.store.count_messages())
