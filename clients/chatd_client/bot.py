"""A small bot helper: handlers for new messages, with the bot's own messages ignored by
default (an echo bot must not answer itself forever)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from chatd.protocol.models import Message
from chatd_client.client import Client

Handler = Callable[[Message], Awaitable[None]]


class Bot:
    """Runs handlers for each new message the client receives.

    ``ignore_self`` (default true) skips messages whose sender is the bot's own user.
    A handler that raises ends :meth:`run` with that exception, so bugs are not hidden.
    """

    def __init__(
        self, chat: Client, *, ignore_self: bool = True, include_edits: bool = False
    ) -> None:
        self.chat = chat
        self.ignore_self = ignore_self
        self.include_edits = include_edits
        self._handlers: list[Handler] = []

    def on_message(self, fn: Handler) -> Handler:
        """Decorator: ``@bot.on_message async def handle(msg): …``."""
        self._handlers.append(fn)
        return fn

    def is_own(self, msg: Message) -> bool:
        me = self.chat.user
        return me is not None and msg.from_.lower() == me.lower()

    async def reply(self, msg: Message, text: str) -> Message:
        """Answer where the message came from: its room, or the sender for a DM."""
        if msg.room is not None:
            return await self.chat.send(text, room=msg.room)
        return await self.chat.send(text, to=msg.from_)

    async def run(self) -> None:
        """Until the client is closed."""
        names = {"message", "message.edited"} if self.include_edits else {"message"}
        async for ev in self.chat.events():
            msg = ev.message
            if ev.name not in names or msg is None or msg.deleted:
                continue
            if self.ignore_self and self.is_own(msg):
                continue
            for handler in self._handlers:
                await handler(msg)
