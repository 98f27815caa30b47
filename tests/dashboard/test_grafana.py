"""docs/grafana/setpoint.json: every metric its queries name is one a running controller
exports. The real ``setpoint controller --metrics-listen`` on a live fleet (real shims,
real mosquitto) is scraped after drift, a reconcile and a rejected report have happened."""

from __future__ import annotations

import json
import re
import secrets
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from dashkit import LiveFleet, publish
from prometheus_client.parser import text_string_to_metric_families

from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker
DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "setpoint.json"
WAIT = 60.0


def queried_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in re.findall(r"\bsetpoint_[a-z_]+\b", e)}


SERIES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def scrape(url: str) -> dict[str, float]:
    """Every series name the endpoint exports with the sum of its values: the samples, and
    the series a declared family without samples yet (a labelled counter nobody has
    incremented) will have."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    series: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SERIES.get(family.type, ("",)):
            series.setdefault(family.name + suffix, 0.0)
        for sample in family.samples:
            series[sample.name] = series.get(sample.name, 0.0) + sample.value
    return series


def test_the_dashboard_file_is_grafana_json_over_our_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "setpoint-fleet" and dashboard["panels"]
    assert {"setpoint_devices", "setpoint_drift_events_total",
            "setpoint_detection_latency_seconds_bucket"} <= queried_metrics()  # fmt: skip


def test_every_metric_the_grafana_dashboard_queries_is_exported(
    broker_session: Any, tmp_path: Path
) -> None:
    prefix = f"setpoint-test/{secrets.token_hex(4)}/v1"
    with ExitStack() as stack:
        fleet = LiveFleet(
            stack, tmp_path, broker_session, prefix, "--metrics-listen", "127.0.0.1:0"
        )
        log = fleet.logs / "controller.log"
        url, deadline = None, time.monotonic() + WAIT
        while url is None and time.monotonic() < deadline:
            found = re.search(r"metrics on (http://\S+/metrics)", log.read_text())
            url = found.group(1) if found else None
            time.sleep(0.1)
        assert url, fleet.logs_text()

        def value(name: str, **labels: str) -> float:
            with urllib.request.urlopen(url, timeout=10) as response:
                families = text_string_to_metric_families(response.read().decode())
            return sum(
                s.value
                for f in families
                for s in f.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )

        while value("setpoint_devices", state="in_sync") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert value("setpoint_devices", state="in_sync") == 2, fleet.logs_text()
        # enforce mode: drift, healed by the shim (a reconcile command only when it lags)
        fleet.edit_setting("kiosk-01", "log_level", "debug")
        fleet.edit_setting("gw-01", "uplink_interval_s", 5)  # observe: drift
        publish(broker_session, [(Topics(prefix).device_reported("ghost-01"), b"\xc1", False)])
        wanted = queried_metrics()

        def settled(exported: dict[str, float]) -> bool:
            return (
                wanted <= exported.keys()
                and exported["setpoint_drift_events_total"] >= 1
                and exported["setpoint_reports_rejected_total"] >= 1
            )

        exported = scrape(url)
        while not settled(exported) and time.monotonic() < deadline:
            time.sleep(0.2)
            exported = scrape(url)
        missing = wanted - exported.keys()
        assert not missing, f"queried by docs/grafana/setpoint.json, not exported: {missing}"
        assert exported["setpoint_drift_events_total"] >= 1
        assert exported["setpoint_reports_rejected_total"] >= 1
