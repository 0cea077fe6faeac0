"""ping and help (wire contract, "Commands")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chatd.protocol import commands as c

if TYPE_CHECKING:
    from chatd.app import App
    from chatd.dispatch import Request

PONG = {"pong": True}


def ping(app: App, req: Request, cmd: c.Ping) -> Any:
    return PONG


def help_(app: App, req: Request, cmd: c.Help) -> Any:
    return app.help_data
