"""Operator pieces without sockets: the JSON log formatter, the stats rates window and
the commit latency percentiles."""

from __future__ import annotations

import json
import logging
import sys

from chatd.logs import JsonFormatter
from chatd.stats import RATE_WINDOW, Stats, percentiles


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.getLogger("chatd").makeRecord(
        "chatd", logging.WARNING, __file__, 1, msg, args, None, extra=extra
    )
    return rec


def test_json_log_lines_are_one_object_with_the_extra_fields() -> None:
    line = JsonFormatter().format(
        _record("closed %s", "x", event="connection_closed", ip="10.0.0.1", queued=5)
    )
    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == "closed x" and data["level"] == "WARNING" and data["logger"] == "chatd"
    assert data["ts"].endswith("Z") and "T" in data["ts"]
    assert (data["event"], data["ip"], data["queued"]) == ("connection_closed", "10.0.0.1", 5)


def test_json_log_lines_survive_odd_values_and_carry_tracebacks() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        rec = _record("failed", thing=object())
        rec.exc_info = sys.exc_info()
    data = json.loads(JsonFormatter().format(rec))
    assert data["thing"].startswith("<object object")
    assert "ValueError: boom" in data["exc"]


def test_rates_come_from_the_oldest_sample_in_the_window() -> None:
    st = Stats(now=0.0)
    for t in range(1, 31):
        st.commands += 100
        st.messages += 10
        st.sample(float(t))
    # At t=30 the window holds t=20..30: 100 commands a second, 10 messages.
    st.commands += 0
    rates = st.rates(30.0)
    assert rates["commands_per_s"] == 100.0 and rates["messages_per_s"] == 10.0
    assert len(st.samples) == RATE_WINDOW + 1
    st.sample(31.0)  # a quiet second lowers the average
    assert st.rates(31.0)["commands_per_s"] == 90.0


def test_rates_are_since_start_until_the_window_is_full() -> None:
    st = Stats(now=100.0)
    st.deliveries = 50
    assert st.rates(102.0)["deliveries_per_s"] == 25.0
    assert st.rates(100.0)["deliveries_per_s"] == 0.0
    st.sample(101.5)  # a sample half a second old would make a noisy rate
    assert st.rates(102.0)["deliveries_per_s"] == 25.0


def test_percentiles_in_milliseconds() -> None:
    assert percentiles([]) == (None, None)
    xs = [i / 1000 for i in range(1, 101)]  # 1 … 100 ms
    assert percentiles(reversed(xs)) == (51.0, 100.0)
