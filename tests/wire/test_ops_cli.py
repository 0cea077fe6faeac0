"""The operator's command line, as real processes: --version, defaults in --help, log
level and format, TLS start-up errors, a TLS server under the real runner (uvloop when
installed), `chatd stats` against it, and --metrics-port."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatd.app import VERSION
from chatd.cli import build_parser
from tests.helpers import TIMEOUT, Client
from tests.process import chatd_run, chatd_serving
from tests.tlsutil import Certs, certs

pytestmark = pytest.mark.one_node("command-line tools and one server process, in subprocesses")

__all__ = ["certs"]  # the fixture
SECRET = "an-operator-secret-that-is-long-enough!!"


async def test_version_prints_chatd_and_the_version() -> None:
    code, out, err = await chatd_run("--version")
    assert (code, out, err) == (0, f"chatd {VERSION}\n", "")


@pytest.mark.parametrize(
    "argv",
    [["serve"], ["user", "add"], ["user", "list"], ["user", "delete"], ["token"], ["stats"],
     ["backup"]],
)  # fmt: skip
def test_every_subcommand_help_shows_the_defaults(argv: list[str]) -> None:
    parser = build_parser()
    sub = parser
    for name in argv:
        action = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction")
        sub = action.choices[name]  # type: ignore[attr-defined]
    text = sub.format_help()
    for action in sub._actions:
        if not action.option_strings or action.default in (None, False, "==SUPPRESS=="):
            continue
        default = action.default
        shown = ",".join(default) if isinstance(default, tuple | list) else str(default)
        # Compared without whitespace: argparse wraps long values anywhere.
        want = "".join(f"(default: {shown})".split())
        assert want in "".join(text.split()), (action.dest, text)


async def test_serve_help_shows_defaults_from_the_real_program() -> None:
    code, out, _ = await chatd_run("serve", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "--port PORT 0 picks a free port (default: 7777)" in flat
    assert "(default: 300.0)" in flat and "--tls-cert FILE" in flat


async def test_an_unknown_log_level_is_refused(tmp_path: Path) -> None:
    code, _, err = await chatd_run("serve", "--db", ":memory:", "--log-level", "LOUD")
    assert code == 2 and "invalid choice: 'LOUD'" in err


@pytest.mark.parametrize("case", ["missing", "mismatch", "garbage", "cert_only"])
async def test_an_unusable_certificate_is_one_clear_line_and_exit_2(
    certs: Certs, tmp_path: Path, case: str
) -> None:
    args = {
        "missing": ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", certs.key],
        "mismatch": ["--tls-cert", certs.cert, "--tls-key", certs.other_key],
        "garbage": ["--tls-cert", certs.garbage, "--tls-key", certs.key],
        "cert_only": ["--tls-cert", certs.cert],
    }[case]
    db = tmp_path / "c.db"
    code, out, err = await chatd_run("serve", "--db", str(db), "--port", "0", *args)
    assert code == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("chatd: "), err
    expect = {
        "missing": "no such file",
        "mismatch": "the key does not belong to the certificate",
        "garbage": "not a PEM certificate",
        "cert_only": "needs both --tls-cert and --tls-key",
    }[case]
    assert expect in err, err
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == [], leftovers  # refused before anything was made


async def _tls_client(port: int, ctx: ssl.SSLContext) -> Client:
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), TIMEOUT)
    c = Client(r, w)
    c.hello = await c.recv()
    return c


async def test_a_tls_server_process_with_json_logs_answers_chatd_stats(
    certs: Certs, tmp_path: Path
) -> None:
    db = str(tmp_path / "ops.db")
    code, _, err = await chatd_run(
        "user", "add", "boss", "--admin", "--password-stdin", "--db", db, "--secret", SECRET,
        stdin="boss-password\n",
    )  # fmt: skip
    assert code == 0, err
    async with chatd_serving(
        "serve", "--db", db, "--secret", SECRET, "--port", "0", "--tls-cert", certs.cert,
        "--tls-key", certs.key, "--log-format", "json", "--metrics-port", "0",
    ) as srv:  # fmt: skip
        start = json.loads(srv.log[-1])
        assert start["level"] == "INFO" and start["event"] == "start"
        assert start["tls"] == "on" and start["port"] == srv.port
        assert start["metrics"].startswith("http://127.0.0.1:")
        c = await _tls_client(srv.port, certs.client())
        assert (await c.ok("ping")) == {"pong": True}
        await c.guest("ann")

        common = ("--port", str(srv.port), "--db", db, "--secret", SECRET)
        code, out, err = await chatd_run("stats", *common, "--tls-ca", certs.cert)
        assert code == 0, err
        lines = dict(line.split(": ", 1) for line in out.splitlines())
        assert lines["version"] == VERSION and lines["tls"] == "True"
        assert lines["connections"] == "2"  # ann and chatd stats itself
        assert lines["users_online"] == "2"
        code, out, err = await chatd_run("stats", *common, "--tls-ca", certs.cert, "--json")
        assert code == 0, err
        data = json.loads(out)
        assert {"version", "uptime", "connections", "users_online", "rooms", "messages",
                "rev"} <= data.keys()  # fmt: skip
        # Without --tls the CLI says what went wrong in one line.
        code, out, err = await chatd_run("stats", *common, "--timeout", "3")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        # A plain client on the TLS port failed its handshake: logged as JSON too.
        metrics = start["metrics"]
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(metrics, timeout=TIMEOUT).read().decode()
        )
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"chatd_connections", "chatd_info", "chatd_refused_connections"} <= names
        await c.close()
    for line in srv.log:
        json.loads(line)  # every line is one JSON object
    assert any(json.loads(line).get("event") == "tls_failed" for line in srv.log)


async def test_a_tls_server_process_answers_frames_sent_right_after_the_handshake(
    certs: Certs,
) -> None:
    """Under the real runner (uvloop when installed): a frame that follows the client's
    Finished at once must not be lost (uvloop's start_tls lost early bytes)."""
    async with chatd_serving(
        "serve", "--db", ":memory:", "--port", "0", "--tls-cert", certs.cert,
        "--tls-key", certs.key, "--idle-timeout", "5",
    ) as srv:  # fmt: skip
        ctx = certs.client()
        for i in range(20):
            r, w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx), TIMEOUT
            )
            w.write(b'{"cmd":"ping","id":%d}\n' % i)  # before reading hello
            c = Client(r, w)
            assert (await c.recv())["event"] == "hello"
            assert await c.reply(i) == {"type": "ok", "id": i, "data": {"pong": True}}
            await c.close()


async def test_chatd_stats_without_an_admin_account_says_so(tmp_path: Path) -> None:
    db = str(tmp_path / "none.db")
    async with chatd_serving("serve", "--db", db, "--secret", SECRET, "--port", "0") as srv:
        code, out, err = await chatd_run(
            "stats", "--port", str(srv.port), "--db", db, "--secret", SECRET
        )
        assert code == 2 and "no admin account" in err and out == ""
    missing = tmp_path / "missing.db"
    code, out, err = await chatd_run("stats", "--db", str(missing), "--secret", SECRET)
    assert code == 2 and "no database" in err and out == ""
    assert not missing.exists()


async def test_a_metrics_port_in_use_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = str(tmp_path / "m.db")
        code, out, err = await chatd_run(
            "serve", "--db", db, "--secret", SECRET, "--port", "0", "--metrics-port", str(port)
        )
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith(f"chatd: cannot serve metrics on 127.0.0.1:{port}")
    # The database was let go: another server can open it at once.
    async with chatd_serving("serve", "--db", db, "--secret", SECRET, "--port", "0") as srv:
        assert srv.port > 0
