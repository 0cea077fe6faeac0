#!/usr/bin/env python3
"""Set-up and everyday commands on a machine that has only python3.

    python3 dev.py serve [chatd serve flags]   run the server (SQLite at ./chatd.db)
    python3 dev.py test  [pytest args]         run the test suite
    python3 dev.py lint                        ruff and mypy (strict) on chatd/
    python3 dev.py bench [name]                run a benchmark under bench/

Each makes ./.venv and installs the project into it the first time (or when
pyproject.toml changed), so nothing needs installing by hand.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".installed"


def ensure_env() -> None:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest and PY.exists():
        return
    if not PY.exists():
        print("dev.py: creating .venv", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev.py: installing chatd and its dev tools into .venv", file=sys.stderr)
    pip = [str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(digest)


def run(args: list[str], *, replace: bool = False) -> int:
    """Run a tool from .venv. With replace (serve, test) this process becomes the tool, so
    Ctrl-C and SIGTERM reach it directly and it exits as the tool does."""
    if replace and os.name == "posix":
        os.chdir(ROOT)
        os.execv(args[0], args)
    proc = subprocess.Popen(args, cwd=ROOT)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # the child got the same Ctrl-C and is shutting down


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    what, rest = argv[0], argv[1:]
    ensure_env()
    if what == "serve":
        return run([str(BIN / "chatd"), "serve", *rest], replace=True)
    if what == "test":
        return run([str(PY), "-m", "pytest", *rest], replace=True)
    if what == "lint":
        code = run([str(PY), "-m", "ruff", "check", "chatd", "clients", "tests", "bench"])
        return code or run([str(PY), "-m", "mypy"])
    if what == "bench":
        name = rest[0] if rest else "all"
        return run([str(PY), str(ROOT / "bench" / "run.py"), name, *rest[1:]])
    print(f"dev.py: unknown command {what!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
