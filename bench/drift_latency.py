"""Report -> drift event latency: how long from a device's report to the ``drift`` event.

    .venv/bin/python bench/drift_latency.py [--reports 1000] [--devices 3]

Starts a private mosquitto (``setpoint.mosquitto.Broker``), a scratch example fleet, and a
real controller with its drift engine in this process; then plays devices with a plain
``setpoint.transport`` session (the codec the controller and the simulator use): each
round publishes one report (QoS 1, retained, as a shim does) that flips a device between
``in_sync`` and ``drifted``, and waits for the drift event on ``events/drift`` at a
second, independent subscriber. The latency is the time from just before the report's
PUBLISH to the event's arrival, measured with one monotonic clock. Prints the median, p90,
p99 and max, and the engine's own detection histogram count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from setpoint.commands import keys
from setpoint.controller import examples
from setpoint.controller.broker import BrokerSettings
from setpoint.controller.drifting import DriftEngine, DriftSettings
from setpoint.controller.service import Controller, ControllerConfig
from setpoint.mosquitto import Broker
from setpoint.proto import bundles, reports
from setpoint.proto.reports import Applied, Report, ResourceReport
from setpoint.proto.topics import Topics
from setpoint.transport import Session, Settings, Subscription

PREFIX = "setpoint/v1"


def report_for(engine: DriftEngine, device: str, seq: int, drifted: bool) -> bytes:
    d = engine._fleet.desired[device]
    resources = []
    for n, r in enumerate(d.resources):
        if drifted and n == 0:
            resources.append(ResourceReport(r.id, r.kind, "drifted", "0" * 64, f"edit {seq}"))
        else:
            resources.append(ResourceReport(r.id, r.kind, "ok", bundles.resource_digest(r)))
    return reports.encode(
        Report(
            device=device, time=int(time.time()), seq=seq, shim_version="bench", mode=d.mode,
            group=d.group,
            applied_group=Applied(d.group, d.group_version, d.commit, d.group_digest),
            applied_device=Applied(d.device, d.device_version, d.commit, d.device_digest),
            resources=tuple(resources),
        )
    )  # fmt: skip


async def measure(work: Path, rounds: int) -> list[float]:
    topics = Topics(PREFIX)
    keys.generate(work / "keys")
    examples.create(work / "fleet")
    with Broker(work / "broker") as broker:
        config = ControllerConfig(
            repo=str(work / "fleet"),
            broker=BrokerSettings(broker.host, broker.port),
            key_path=work / "keys" / keys.PRIVATE_NAME,
            state_dir=work / "state",
            prefix=PREFIX,
        )
        settings = DriftSettings(tick=1.0, reconcile_interval=3600)
        async with Controller(config, drift=settings) as controller:
            engine = controller.drift
            assert engine is not None
            await asyncio.wait_for(engine.ready.wait(), 30)
            devices = sorted(engine._fleet.desired)
            arrived: asyncio.Queue[tuple[float, dict[str, object]]] = asyncio.Queue()

            def on_event(topic: str, payload: bytes, retain: bool) -> None:
                # Stamped in the network callback, before any queue.
                arrived.put_nowait((time.monotonic(), json.loads(payload)))

            watch = await Session.open(Settings(broker.host, broker.port, "bench-watch"), on_event)
            device = await Session.open(Settings(broker.host, broker.port, "bench-device"))
            try:
                await watch.subscribe([Subscription(topics.event("drift"), 1)])
                state = dict.fromkeys(devices, False)
                latencies: list[float] = []
                seq = 0
                warmup = 10
                # Settle every device in sync first (not measured).
                for name in devices:
                    seq += 1
                    topic = topics.device_reported(name)
                    await (await device.publish(topic, report_for(engine, name, seq, False),
                                                qos=1, retain=True))  # fmt: skip
                # The fleet's devices only: under load (bench.drift_load) the engine
                # also holds statuses of the load's devices, which are in no fleet.
                await engine.wait_for(
                    lambda: all(
                        (s := engine.statuses().get(name)) is not None and s.state == "in_sync"
                        for name in devices
                    ),
                    timeout=30,
                )
                while not arrived.empty():
                    arrived.get_nowait()
                for n in range(rounds + warmup):
                    name = devices[n % len(devices)]
                    state[name] = not state[name]
                    seq += 1
                    payload = report_for(engine, name, seq, state[name])
                    t0 = time.monotonic()
                    await (await device.publish(topics.device_reported(name), payload, qos=1,
                                                retain=True))  # fmt: skip
                    while True:
                        t1, event = await asyncio.wait_for(arrived.get(), 10)
                        if event.get("device") == name and event.get("report_seq") == seq:
                            break
                    if n >= warmup:
                        latencies.append(t1 - t0)
            finally:
                watch.close()
                device.close()
            hist = engine.metrics.latency.collect()[0]
            count = next(s.value for s in hist.samples if s.name.endswith("_count"))
            print(f"engine detection histogram: {count:.0f} observations")
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=1000, help="measured reports")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="setpoint-bench-drift-") as tmp:
        latencies = asyncio.run(measure(Path(tmp), args.reports))
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100)
    print(
        f"report -> drift event over {len(ms)} reports: median {statistics.median(ms):.2f} ms,"
        f" p90 {q[89]:.2f} ms, p99 {q[98]:.2f} ms, max {ms[-1]:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
