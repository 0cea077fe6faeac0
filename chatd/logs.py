"""Logging set-up for `chatd serve`: plain lines for people, or one JSON object per line
(`--log-format json`) for log shippers."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
# What every LogRecord has; anything else on a record came from `extra=` and is data.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    """`{"ts","level","logger","msg", …extra fields, "exc"?}` on one line.

    ``ts`` is RFC 3339 UTC with milliseconds; the fields passed with ``extra=`` (``event``,
    ``ip``, ``reason`` …) are copied as they are, so shippers can filter on them.
    """

    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.msecs)
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return _encoder.encode(out).decode() if _plain(out) else _fallback(out)


def _plain(out: dict[str, Any]) -> bool:
    return all(isinstance(v, str | int | float | bool | None | list | dict) for v in out.values())


def _fallback(out: dict[str, Any]) -> str:
    return _encoder.encode({k: v if _plain({k: v}) else repr(v) for k, v in out.items()}).decode()


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
