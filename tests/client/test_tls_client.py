"""The client library and the terminal client against a TLS server (real handshakes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from chatd_client import connect, tui
from chatd_client.client import Options
from chatd_client.errors import ConnectionLost
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from tests.client.util import T
from tests.helpers import running_server
from tests.tlsutil import Certs, certs

__all__ = ["certs"]  # the fixture


async def test_the_terminal_client_talks_to_a_tls_server(certs: Certs) -> None:
    async with running_server(tls_cert=certs.cert, tls_key=certs.key) as srv:
        with create_pipe_input() as pipe:
            task = asyncio.ensure_future(
                tui.run("127.0.0.1", srv.port, user="tui", password=None, token=None,
                        room="lobby", input=pipe, output=DummyOutput(), ssl=certs.client())
            )  # fmt: skip
            async with connect("127.0.0.1", srv.port, user="bob", ssl=certs.client()) as bob:
                async with asyncio.timeout(T):
                    while "lobby" not in [r.name for r in await bob.room_list()]:
                        await asyncio.sleep(0.02)
                await bob.join("lobby")
                pipe.send_text("hello over tls\r")
                async with asyncio.timeout(T):
                    async for ev in bob.events():
                        if ev.message is not None and ev.message.text == "hello over tls":
                            break
            pipe.send_text("/quit\r")
            await asyncio.wait_for(task, T)


async def test_the_library_without_ssl_cannot_talk_to_a_tls_server(certs: Certs) -> None:
    async with running_server(tls_cert=certs.cert, tls_key=certs.key) as srv:
        # A plain client waits for a hello that never comes (the server waits for a
        # ClientHello): it gives up at its connect timeout.
        quick = Options(connect_timeout=0.5, ping_interval=None)
        with pytest.raises(ConnectionLost):
            await connect("127.0.0.1", srv.port, user="ann", options=quick)


def test_chatd_cli_says_so_when_the_ca_file_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = tui.main(["--user", "ann", "--tls-ca", str(tmp_path / "nope.pem")])
    assert code == 2
    assert "no such file" in capsys.readouterr().err
