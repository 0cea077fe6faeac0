"""A real redis-server for the tests (issue 11): Debian's `redis-server` found on PATH,
started on a free loopback port with its own temporary directory, AOF with `appendfsync
always` and no RDB snapshots; never a system service.

One server is started lazily per test session (`session_redis()`) and stopped at exit;
`fresh_redis_url()` empties it for the next test. Multi-node tests can start more with
`RedisServer(...).start()`. Without redis-server on PATH a test is skipped with the reason,
except in CI (env CI=true), where it fails: a Redis test must never be silently skipped."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest
import redis

READY_TIMEOUT = 15.0  # seconds for redis-server to say it accepts connections


def redis_server_path() -> str:
    """The redis-server binary, or skip (fail in CI) saying why."""
    path = shutil.which("redis-server")
    if path is None:
        why = "redis-server is not on PATH (Debian: apt-get install redis-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}; CI must run the Redis tests (.ci/run installs it)")
        pytest.skip(why)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process on 127.0.0.1 with a private data directory."""

    def __init__(self, directory: str | None = None, *, appendfsync: str = "always") -> None:
        self.dir = directory or tempfile.mkdtemp(prefix="chatd-redis-")
        self._own_dir = directory is None
        self.appendfsync = appendfsync
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it (on the same port again after a stop) and wait for its "Ready" line."""
        binary = redis_server_path()
        for _ in range(5):  # a free port can be taken between the probe and the bind
            port = self.port or _free_port()
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self.dir,
                 "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
                 "--logfile", "", "--daemonize", "no", "--protected-mode", "yes"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            ready, reader = self._wait_ready(proc)
            self.port, self.proc, self._reader = port, proc, reader
            if ready:
                return self
            self.stop(kill=True)
            self.port = 0
        raise RuntimeError(f"redis-server did not start in {self.dir}")

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[str]) -> tuple[bool, threading.Thread]:
        """Read its log until "Ready to accept connections" (or it exits, or time is up)."""
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if "Ready to accept connections" in line:
                    ready.set()
            # Keep draining to EOF so the pipe never fills and blocks the server.

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                return False, reader
        return True, reader

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is not None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(10)
            if self._reader is not None:
                self._reader.join(10)  # it reads the log to EOF, which the exit brings
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


_session: RedisServer | None = None


def session_redis() -> RedisServer:
    """The test session's shared redis-server, started on first use."""
    global _session
    if _session is None:
        _session = RedisServer().start()
        atexit.register(_session.close)
    return _session


def fresh_redis_url() -> str:
    """The shared server's URL, emptied (FLUSHALL) for the calling test."""
    server = session_redis()
    with server.client() as c:
        c.flushall()
    return server.url
