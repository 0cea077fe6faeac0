"""A bot with nothing but the standard library, to show the frame format: one JSON
object per line each way. Answers "!ping" with "pong" in a room.

    python clients/examples/raw_socket_bot.py --port 7777 --room lobby --user rawbot
"""

import argparse
import json
import socket
from collections.abc import Callable, Iterable


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7777)
    p.add_argument("--room", default="lobby")
    p.add_argument("--user", default="rawbot")
    a = p.parse_args()

    sock = socket.create_connection((a.host, a.port))
    lines = sock.makefile("r", encoding="utf-8", newline="\n")

    def send(frame: dict[str, object]) -> None:
        sock.sendall(json.dumps(frame).encode() + b"\n")

    hello = json.loads(lines.readline())  # {"type":"event","event":"hello",...}
    print("server", hello["data"]["version"], "protocol", hello["data"]["protocol"], flush=True)
    send({"cmd": "login", "id": 1, "user": a.user})  # a guest login: no password
    send({"cmd": "room.join", "id": 2, "room": a.room})
    try:
        serve(a.user, a.room, lines, send)
    except KeyboardInterrupt:
        send({"cmd": "logout", "id": 3})  # a guest gives its name back at once


def serve(
    user: str, room: str, lines: Iterable[str], send: Callable[[dict[str, object]], None]
) -> None:
    for line in lines:
        frame = json.loads(line)
        if frame["type"] == "error":  # {"type":"error","id":..,"code":..,"message":..}
            print("error", frame["code"], frame["message"], flush=True)
        elif frame["type"] == "ok" and frame["id"] == 2:
            print("joined", room, flush=True)
        elif frame["type"] == "event" and frame["event"] == "message":
            msg = frame["data"]
            if msg["from"].lower() != user.lower() and msg["text"].strip() == "!ping":
                send({"cmd": "msg.send", "id": msg["id"], "room": msg["room"], "text": "pong"})


if __name__ == "__main__":
    main()
