"""Drift latency idle and under load, against the broker's own round trip, in one run.

    .venv/bin/python -m bench.drift_load [--reports 1000] [--load-rate R] [--quick]

The report -> drift event measurement itself is ``bench/drift_latency.py`` (the drift
engine's benchmark: a real controller and drift engine, one report at a time, the event
awaited at an independent subscriber). This module runs it twice on a broker it wraps:

1. **broker round trip**: before anything else, a lean client publishes QoS 1 to a topic
   it subscribes to and waits for the message to come back (``--rtt`` samples): the
   physical floor of any report -> event path through this broker;
2. **idle**: ``drift_latency.measure`` as it is;
3. **under load**: the same while another process publishes real reports (retained,
   QoS 1) from 2,000 other devices at ``--load-rate`` per second: a quarter of the
   controller's measured ingest rate (the latest ``bench.ingest`` result), or 500/s.

The broker saves its database every 100,000 changes (not after each one, the harness's
safe default) so that disk writes do not dominate under load. Latencies are written to
``bench/results/drift-latency.json`` for the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from setpoint.mosquitto import Broker
from setpoint.proto import reports
from setpoint.proto.reports import Report
from setpoint.proto.topics import Topics
from setpoint.sim import mqtt
from setpoint.transport import raw

from . import drift_latency
from .common import RESULTS, percentile, record, table

LOAD_DEVICES = 2000


async def round_trips(host: str, port: int, samples: int) -> list[float]:
    """Seconds for a QoS 1 message to come back to its publisher through the broker."""
    back: asyncio.Queue[float] = asyncio.Queue()
    conn = await mqtt.open_connection(
        host, port, f"bench-rtt-{os.getpid()}",
        on_message=lambda t, p, r: back.put_nowait(time.perf_counter()),
    )  # fmt: skip
    topic = f"bench/rtt/{os.getpid()}"
    await conn.subscribe([(topic, 1)])
    out = []
    for i in range(samples + 20):
        t0 = time.perf_counter()
        conn.publish(topic, b"%d" % i, qos=1)
        t1 = await asyncio.wait_for(back.get(), 5)
        if i >= 20:
            out.append(t1 - t0)
    conn.disconnect()
    return out


def _load(host: str, port: int, rate: float, stop: Any, sent: Any) -> None:
    """Publish reports of LOAD_DEVICES devices at ``rate`` per second until ``stop``."""
    topics = Topics(drift_latency.PREFIX)
    now = int(time.time())
    packets = []
    for i in range(LOAD_DEVICES):
        name = f"load-{i:05d}"
        payload = reports.encode(Report(device=name, time=now, seq=1, shim_version="load"))
        packets.append(raw.publishes([(topics.device_reported(name), payload, 1, True)]))
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(raw.connect(f"bench-load-{os.getpid()}", keepalive=300))
    sock.recv(4)

    def drain() -> None:
        while sock.recv(1 << 16):
            pass

    threading.Thread(target=drain, daemon=True).start()
    start, n, batch = time.monotonic(), 0, max(1, int(rate / 100))
    while not stop.is_set():
        due = start + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        chunk = b"".join(packets[(n + k) % LOAD_DEVICES] for k in range(batch))
        sock.sendall(chunk)
        n += batch
    sent.value = n
    sock.close()


class LoadedBroker(Broker):
    """The harness's broker, with its round trip measured first and, if asked, a load."""

    rate: float = 0.0
    rtt_samples: int = 1000
    last: dict[str, Any] = {}  # one run at a time

    def __init__(self, directory: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("autosave_changes", 100_000)
        super().__init__(directory, **kwargs)
        self._load: Any = None

    def __enter__(self) -> LoadedBroker:
        super().__enter__()
        # We are inside drift_latency's event loop: measure from a thread of our own.
        rtt = run_thread(lambda: round_trips(self.host, self.port, self.rtt_samples))
        LoadedBroker.last = {"rtt": rtt}
        if self.rate > 0:
            ctx = multiprocessing.get_context("fork")
            self._stop, self._sent = ctx.Event(), ctx.Value("q", 0)
            self._load = ctx.Process(
                target=_load, args=(self.host, self.port, self.rate, self._stop, self._sent)
            )
            self._load.start()
            self._load_started = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._load is not None:
            self._stop.set()
            self._load.join(10)
            took = time.monotonic() - self._load_started
            LoadedBroker.last["load_rate_achieved"] = self._sent.value / took
        super().__exit__(*exc)


def run_thread(coro_factory: Any) -> Any:
    """Run a coroutine to completion in a new event loop on a thread of its own."""
    box: dict[str, Any] = {}

    def target() -> None:
        box["value"] = asyncio.run(coro_factory())

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return box["value"]


def measure(rounds: int, rate: float, rtt_samples: int) -> tuple[list[float], dict[str, Any]]:
    LoadedBroker.rate = rate
    LoadedBroker.rtt_samples = rtt_samples
    original = drift_latency.Broker
    drift_latency.Broker = LoadedBroker  # type: ignore[misc]
    try:
        with tempfile.TemporaryDirectory(prefix="bench-drift-load-") as tmp:
            latencies = asyncio.run(drift_latency.measure(Path(tmp), rounds))
    finally:
        drift_latency.Broker = original  # type: ignore[misc]
    return latencies, dict(LoadedBroker.last)


def ingest_rate() -> float | None:
    """The controller's full-ingest rate from the latest ``bench.ingest`` result."""
    if not RESULTS.exists():
        return None
    rate = None
    for line in RESULTS.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("bench") == "ingest":
            for run in entry["runs"]:
                if run["subscriber"].startswith("controller"):
                    rate = float(run["rate"])
    return rate


def ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=None, help="default 1000 (quick: 300)")
    parser.add_argument("--load-rate", type=float, default=None)
    parser.add_argument("--rtt", type=int, default=1000, help="round-trip samples")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds = args.reports or (300 if args.quick else 1000)
    measured = ingest_rate()
    rate = args.load_rate or (measured / 4 if measured else 500.0)
    idle, idle_info = measure(rounds, 0.0, args.rtt)
    loaded, load_info = measure(rounds, rate, args.rtt)
    rtt = idle_info["rtt"]
    rows = [
        ["broker round trip (idle)", len(rtt), ms(rtt, 0.5), ms(rtt, 0.99), "-"],
        ["report -> drift event, idle", len(idle), ms(idle, 0.5), ms(idle, 0.99),
         round(percentile(idle, 0.99) / percentile(rtt, 0.99), 1)],
        [f"report -> drift event, load {rate:.0f}/s", len(loaded), ms(loaded, 0.5),
         ms(loaded, 0.99), round(percentile(loaded, 0.99) / percentile(rtt, 0.99), 1)],
    ]  # fmt: skip
    table("Drift latency (ms)", ["path", "samples", "p50", "p99", "p99 / RTT p99"], rows)
    result = {
        "rtt_p50_ms": ms(rtt, 0.5),
        "rtt_p99_ms": ms(rtt, 0.99),
        "idle_p50_ms": ms(idle, 0.5),
        "idle_p99_ms": ms(idle, 0.99),
        "load_p50_ms": ms(loaded, 0.5),
        "load_p99_ms": ms(loaded, 0.99),
        "load_rate": round(rate, 1),
        "load_rate_achieved": round(load_info.get("load_rate_achieved", 0.0), 1),
        "load_rate_source": "ingest/4" if measured and not args.load_rate else "given",
        "ratio_idle_p99_to_rtt_p99": rows[1][4],
        "ratio_load_p99_to_rtt_p99": rows[2][4],
        "reports": rounds,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    (RESULTS.parent / "drift-latency.json").write_text(
        json.dumps({"rtt": rtt, "idle": idle, "load": loaded, "load_rate": rate})
    )
    record("drift", args.quick, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
