"""Echo bot: repeats every message in a room. Its own messages are ignored (Bot default),
so it never answers itself.

    python -m chatd_client.examples.echo_bot --port 7777 --room lobby --user echo
"""

from __future__ import annotations

import argparse
import asyncio

from chatd_client import Bot, Message, NotFound, connect


async def run(host: str, port: int, room: str, user: str, password: str | None = None) -> None:
    async with connect(host, port, user=user, password=password) as chat:
        try:
            await chat.join(room)
        except NotFound:
            await chat.room_create(room)  # the creator joins it
        bot = Bot(chat)

        @bot.on_message
        async def echo(msg: Message) -> None:
            await bot.reply(msg, f"echo: {msg.text}")

        await bot.run()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7777)
    p.add_argument("--room", default="lobby")
    p.add_argument("--user", default="echo")
    a = p.parse_args()
    try:
        asyncio.run(run(a.host, a.port, a.room, a.user))
    except KeyboardInterrupt:
        pass  # Ctrl-C: closing the client logged the guest out


if __name__ == "__main__":
    main()
