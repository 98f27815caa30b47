"""Prometheus metrics of the controller's drift engine, and the HTTP endpoint serving them.

Every :class:`Metrics` has its own registry (so several engines in one process, as in the
tests, never collide on metric names). Served with ``prometheus_client``'s own HTTP server
(``--metrics-listen HOST:PORT``) in a daemon thread; :meth:`Metrics.close` stops it.

Metrics (all prefixed ``setpoint_``):

========================================  ========  ==========================================
``devices{group,state}``                  gauge     devices per drift state per group
``drift_events_total{group,change}``      counter   drift events published (opened/changed/resolved)
``publications_total{kind,reason}``       counter   bundles published or removed by the controller
``reports_received_total``                counter   reports taken in (ingest rate: ``rate()``)
``reports_rejected_total{reason}``        counter   reports not believed (malformed, too-large, ...)
``presence_received_total``               counter   presence messages taken in
``reports_coalesced_total``               counter   reports superseded before evaluation
``detection_latency_seconds``             histogram from a report's arrival to its drift decision
``reconcile_commands_total{group}``       counter   reconcile commands sent to drifted devices
``resent_total{reason}``                  counter   retained bundles published again, unchanged
``slow_acks_total{kind}``                 counter   bundles acknowledged slower than --slow-ack
``rereads_total``                         counter   retained bundles read again after a slow ack
========================================  ========  ==========================================

Does no MQTT; the engine updates the values.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
NO_GROUP: Final = "-"


class Metrics:
    """The drift engine's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.devices = Gauge(
            "setpoint_devices", "Devices per drift state per group", ["group", "state"], registry=r
        )
        self.drift_events = Counter(
            "setpoint_drift_events", "Drift events published", ["group", "change"], registry=r
        )
        self.publications = Counter(
            "setpoint_publications",
            "Bundles published or removed by the controller",
            ["kind", "reason"],
            registry=r,
        )
        self.reports = Counter("setpoint_reports_received", "Reports taken in", registry=r)
        self.reports_rejected = Counter(
            "setpoint_reports_rejected", "Reports not believed", ["reason"], registry=r
        )
        self.presence = Counter("setpoint_presence_received", "Presence messages", registry=r)
        self.coalesced = Counter(
            "setpoint_reports_coalesced",
            "Reports replaced by a newer one from the same device before evaluation",
            registry=r,
        )
        self.latency = Histogram(
            "setpoint_detection_latency_seconds",
            "From a report's arrival to its drift decision (published when it changed)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.commands = Counter(
            "setpoint_reconcile_commands",
            "Reconcile commands sent to drifted devices",
            ["group"],
            registry=r,
        )
        self.resent = Counter(
            "setpoint_resent",
            "Retained bundles published again, the same envelope, because a device stayed"
            " behind (controller/resending.py)",
            ["reason"],
            registry=r,
        )
        self.slow_acks = Counter(
            "setpoint_slow_acks",
            "Bundle publications the broker acknowledged slower than --slow-ack: a clustered"
            " engine may not have stored them (controller/rereading.py)",
            ["kind"],
            registry=r,
        )
        self.rereads = Counter(
            "setpoint_rereads",
            "Reads of the retained bundles through a fresh subscription after a slow"
            " acknowledgement, once the broker answered promptly again",
            registry=r,
        )
        self._known: set[tuple[str, str]] = set()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def set_devices(self, counts: Mapping[str, Mapping[str, int]], states: Iterable[str]) -> None:
        """Set the per-group, per-state gauge; groups that vanished drop to zero."""
        seen: set[tuple[str, str]] = set()
        for group, per_state in counts.items():
            for state in states:
                key = (group or NO_GROUP, state)
                self.devices.labels(*key).set(per_state.get(state, 0))
                seen.add(key)
        for key in self._known - seen:
            self.devices.labels(*key).set(0)
        self._known |= seen

    def set_group(self, group: str, per_state: Mapping[str, int], states: Iterable[str]) -> None:
        """Set one group's per-state gauge (a running count that moved)."""
        for state in states:
            key = (group or NO_GROUP, state)
            self.devices.labels(*key).set(per_state.get(state, 0))
            self._known.add(key)

    def forget_devices(self) -> None:
        """Drop every per-group, per-state sample: whoever keeps the counts is elsewhere now
        (a replica that stepped down; its metrics go on serving the shards it owns)."""
        self.devices.clear()
        self._known.clear()

    def render(self) -> bytes:
        """The exposition text (what the HTTP endpoint serves)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (port 0: any free port); returns the port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
