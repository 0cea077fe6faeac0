"""The protocol core and the client library stand alone (issue 10; STYLE habit 15): importing
them loads none of the server. Each check runs in a fresh interpreter, so what other tests
imported does not count."""

from __future__ import annotations

import subprocess
import sys

import pytest

SERVER_MODULES = {
    "chatd.app",
    "chatd.auth",
    "chatd.rooms",
    "chatd.server",
    "chatd.dispatch",
    "chatd.store",
    "chatd.store.sqlite",
    "sqlite3",
    "jwt",
    "argon2",
}


def loaded_by(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(out.split())


def test_the_protocol_loads_no_server_module_and_no_asyncio() -> None:
    loaded = loaded_by("chatd.protocol")
    assert not loaded & (SERVER_MODULES | {"asyncio"}), sorted(
        loaded & (SERVER_MODULES | {"asyncio"})
    )


@pytest.mark.parametrize("module", ["chatd_client", "chatd"])
def test_the_client_library_and_the_package_load_no_server_module(module: str) -> None:
    loaded = loaded_by(module)
    assert not loaded & SERVER_MODULES, sorted(loaded & SERVER_MODULES)
