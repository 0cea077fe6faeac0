"""Moderation bot: deletes messages containing a banned word. Its token needs the
``msg:delete:any`` grant (a registered account's login has it by default; a guest's has not).

    python -m chatd_client.examples.moderation_bot --room lobby --user mod --words spam,scam
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re

from chatd_client import Bot, Message, NotFound, connect


def matcher(words: list[str]) -> re.Pattern[str]:
    return re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)


async def run(
    host: str, port: int, rooms: list[str], user: str, password: str | None, words: list[str]
) -> None:
    banned = matcher(words)
    async with connect(host, port, user=user, password=password) as chat:
        if "msg:delete:any" not in chat.grants:
            raise SystemExit("the moderation bot needs the msg:delete:any grant")
        for room in rooms:
            try:
                await chat.join(room)
            except NotFound:
                await chat.room_create(room)  # the creator joins it
        bot = Bot(chat, include_edits=True)  # an edit must not sneak a word in

        @bot.on_message
        async def moderate(msg: Message) -> None:
            if banned.search(msg.text):
                try:
                    await chat.delete(msg.id)
                except NotFound:
                    pass  # already gone

        await bot.run()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7777)
    p.add_argument("--room", action="append", default=[])
    p.add_argument("--user", default="mod")
    p.add_argument("--words", default="spam")
    a = p.parse_args()
    password = os.environ.get("CHATD_PASSWORD")
    try:
        asyncio.run(
            run(a.host, a.port, a.room or ["lobby"], a.user, password, a.words.split(","))
        )
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
