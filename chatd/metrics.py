"""`--metrics-port`: the `stats` figures in Prometheus text format, on
http://HOST:PORT/metrics, through prometheus_client (no hand-written exposition).

prometheus_client's WSGI app, served by a threading wsgiref server in its own thread, on
/metrics only (other paths get 404, so a typo is not mistaken for an empty scrape). At each scrape the collector asks
the event loop for one `stats` report (the same figures as the admin command, made on the
loop thread, so nothing is read while the loop changes it) and turns it into metric
families. Nothing is counted per frame for Prometheus: the hot paths only feed chatd.stats.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

log = logging.getLogger("chatd")

# A scrape waits this long for the loop; a loop that busy is itself the news.
_SCRAPE_TIMEOUT = 5.0

Report = Callable[[], Coroutine[Any, Any, dict[str, Any]]]

# stats key -> (metric name, help); counters get "_total" from prometheus_client.
_GAUGES = {
    "uptime": ("chatd_uptime_seconds", "Seconds since the server started"),
    "connections": ("chatd_connections", "Open connections (TLS handshakes included)"),
    "connections_logged_in": ("chatd_connections_logged_in", "Connections bound to a user"),
    "connections_guests": ("chatd_connections_guests", "Connections bound to a guest"),
    "connections_handshaking": ("chatd_connections_handshaking", "TLS handshakes under way"),
    "users_online": ("chatd_users_online", "Users with at least one bound connection"),
    "rooms": ("chatd_rooms", "Rooms"),
    "messages": ("chatd_messages_stored", "Messages stored (tombstones included)"),
    "rev": ("chatd_revision", "The store's current revision"),
    "commands_per_s": ("chatd_commands_per_second", "Commands per second (sliding window)"),
    "messages_per_s": ("chatd_messages_per_second", "Messages posted per second (sliding window)"),
    "deliveries_per_s": ("chatd_deliveries_per_second", "Event frames queued to connections per second (sliding window)"),
    "bytes_in_per_s": ("chatd_received_bytes_per_second", "Bytes received per second (sliding window)"),
    "bytes_out_per_s": ("chatd_sent_bytes_per_second", "Bytes sent per second (sliding window)"),
    "rss_bytes": ("chatd_resident_memory_bytes", "Resident memory of the server process"),
}
_COUNTERS = {
    "commands_total": ("chatd_commands", "Commands run"),
    "messages_total": ("chatd_messages_posted", "Messages posted"),
    "deliveries_total": ("chatd_deliveries", "Event frames queued to connections"),
    "bytes_in": ("chatd_received_bytes", "Bytes received from clients"),
    "bytes_out": ("chatd_sent_bytes", "Bytes written to clients"),
    "slow_consumers": ("chatd_slow_consumer_drops", "Connections dropped past the outbox hard limit"),
    "stuck_writers": ("chatd_stuck_writer_drops", "Connections dropped past the write deadline"),
    "idle_closed": ("chatd_idle_closes", "Connections closed for not logging in in time"),
    "rate_limited": ("chatd_rate_limited", "rate_limited errors sent for commands"),
    "throttled": ("chatd_throttled", "Commands held back by the per-connection command rate"),
    "bad_frames": ("chatd_bad_frames", "Frames that were not a valid command"),
    "login_bursts": ("chatd_failed_login_bursts", "Failed-login bursts that reached the limit"),
    "tls_handshake_failures": ("chatd_tls_handshake_failures", "TLS handshakes that failed or timed out"),
    "store_errors": ("chatd_store_errors", "Store write batches that failed"),
}


class StatsCollector(Collector):
    """Reads one stats report per scrape, on the event loop, and yields it as metrics."""

    def __init__(self, loop: asyncio.AbstractEventLoop, report: Report) -> None:
        self.loop = loop
        self.report = report

    def collect(self) -> Iterator[Metric]:
        fut = asyncio.run_coroutine_threadsafe(self.report(), self.loop)
        stats = fut.result(_SCRAPE_TIMEOUT)  # raising here makes the scrape fail (500)
        yield from families(stats)


def families(stats: dict[str, Any]) -> Iterator[Metric]:
    """The metric families for one stats report (chatd.stats.Stats.report)."""
    info = InfoMetricFamily("chatd", "chatd version and transport")
    info.add_metric([], {"version": str(stats["version"]), "tls": str(stats["tls"]).lower()})
    yield info
    for key, (name, doc) in _GAUGES.items():
        value = stats.get(key)
        if value is not None:
            yield GaugeMetricFamily(name, doc, value=float(value))
    for key, (name, doc) in _COUNTERS.items():
        yield CounterMetricFamily(name, doc, value=float(stats.get(key) or 0))
    refused = CounterMetricFamily(
        "chatd_refused_connections", "Connections refused at accept, by reason", labels=["reason"]
    )
    for reason, n in sorted(stats["refused"].items()):
        refused.add_metric([reason], float(n))
    yield refused
    commit = GaugeMetricFamily(
        "chatd_store_commit_seconds",
        "Store transaction time (BEGIN to COMMIT, fsync included) over the last 1024 commits",
        labels=["quantile"],
    )
    for q, key in (("0.5", "store_commit_p50_ms"), ("0.99", "store_commit_p99_ms")):
        if stats.get(key) is not None:
            commit.add_metric([q], round(stats[key] / 1000.0, 9))
    yield commit


class MetricsListenError(Exception):
    """The metrics port cannot be bound; the message names it."""


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (chatd's log is for chatd)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _only_metrics(app: Any) -> Any:
    """The exposition on GET /metrics; 404 elsewhere."""

    def serve(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: metrics are at /metrics\n"]
        return app(environ, start_response)

    return serve


class MetricsServer:
    """prometheus_client's HTTP server in its own thread, for one ChatServer."""

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop, report: Report):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(loop, report))
        try:
            self.httpd = make_server(
                host, port, _only_metrics(make_wsgi_app(self.registry)),
                ThreadingWSGIServer, handler_class=_QuietHandler,
            )
        except OSError as exc:
            raise MetricsListenError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self.port: int = self.httpd.server_port
        self.host = host
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="chatd-metrics", daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        """Stop serving (waits for a scrape in progress, bounded by its timeout)."""
        stopper = threading.Thread(target=self.httpd.shutdown, daemon=True)
        stopper.start()
        stopper.join(_SCRAPE_TIMEOUT + 1)
        self.httpd.server_close()
