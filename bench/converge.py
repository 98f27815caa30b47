"""Commit to converged: from ``git commit`` to the last device's ``in_sync``, against a bare
reference measured on the same broker in the same run.

    .venv/bin/python -m bench.converge [--devices 1000 10000] [--quick] [--engine nats-cluster]
        [--rollout '{batch: 10%}']

For each fleet size N:

1. **Bare reference.** ``setpoint sim --echo`` runs N devices that answer each message on
   their desired topic; the benchmark publishes N retained QoS 1 messages (one per device,
   the size of a group bundle) and waits for the N answers. No setpoint logic: the cost of
   moving the same number of retained messages and replies through this broker.
2. **setpoint.** A repository of N simulated devices in one enforce group, a real
   controller (drift engine included), ``setpoint sim`` with N devices that verify, apply
   and report. Once all are ``in_sync``, a commit changes the group; the clock runs from
   just before ``git commit`` to the last device's retained drift status saying
   ``in_sync`` on the new version. The arrival time of every device's ``in_sync`` is the
   convergence curve (``bench/results/converge-N.json``, plotted by ``bench.plots``).

Also recorded: when the controller noticed the commit (its ``published`` event), the
controller's CPU seconds from the commit to the last ``in_sync``, the RSS of the controller,
the broker and the simulator at N devices.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from setpoint.proto.topics import Topics
from setpoint.sim import fleetrepo
from setpoint.transport import Session, Settings

from .common import (
    ENGINES,
    RESULTS,
    Stack,
    Watcher,
    cpu_seconds,
    record,
    rss_mb,
    spy_on,
    start_sim,
    table,
)

BUNDLE_SIZE = 700
# The simulated devices connect at the simulator's default rate (2,000 a second) on one
# broker; on a NATS cluster at 100 a second, as a fleet reconnecting with backoff and
# jitter does. Every QoS 1 subscription there is a JetStream consumer: 1,000 devices
# subscribing three topics each within a second held every retained write of the
# controller behind them (PUBACKs after 3.5-6 s) and first convergence took 112 s; paced,
# 17-50 s (docs/performance.md, where the commit-to-converged figures vary as widely).
CONNECT_RATE = {"nats-cluster": "100", "nats-cluster-safe": "100"}
WAIT = 300.0  # bytes: about a signed group bundle of three resources


async def bare_reference(stack: Stack, n: int) -> float:
    """Seconds from the first of N retained publications to the N-th reply."""
    topics = Topics("bench-bare/v1")
    sim = start_sim(stack.broker.url, n, "--echo", "--prefix", topics.prefix, "--connect-rate", "0")
    try:
        watcher = Watcher(
            stack.broker.host, stack.broker.port, [topics.all_reported()], keep_arrivals=False
        )
        async with watcher:
            pub = await Session.open(
                Settings(stack.broker.host, stack.broker.port, "bench-bare", protocol="3.1.1")
            )
            payload = b"\x01" * BUNDLE_SIZE
            names = [f"sim-{i:05d}" for i in range(n)]
            started = time.time()
            for name in names:  # pipelined: up to the transport's in-flight window
                await pub.publish(topics.device_desired(name), payload, qos=1, retain=True)
            await watcher.until(lambda: len(watcher.latest) >= n)
            took = time.time() - started
            pub.close()
        return took
    finally:
        sim.stop()


class Stalled(TimeoutError):
    """The fleet did not get there within the wait; says how far it got."""


class Convergence:
    """Counts devices whose retained drift status is in_sync on a given group version."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.version = 1
        self.done: dict[str, float] = {}
        self.published_at: float | None = None

    def parse(self, topic: str, payload: bytes) -> None:
        now = time.time()
        ref = self.topics.parse(topic)
        if ref.kind == "event":
            if self.published_at is None and self.version > 1:
                self.published_at = now
            return
        if not payload:
            return
        status = json.loads(payload)
        if status.get("state") == "in_sync" and status.get("applied_version") == self.version:
            self.done.setdefault(ref.name, now)

    def reset(self, version: int) -> None:
        self.version, self.done, self.published_at = version, {}, None


def profile(stack: Stack, sim: Any) -> list[subprocess.Popen[bytes]]:
    """With BENCH_PROFILE=DIR, py-spy profiles of the controller and the simulator."""
    assert stack.controller is not None
    spies = [
        spy_on(stack.controller.pid, f"converge-controller-{stack.devices}"),
        spy_on(sim.proc.pid, f"converge-sim-{stack.devices}"),
    ]
    return [s for s in spies if s is not None]


async def wait(watcher: Watcher, conv: Convergence, n: int, what: str) -> None:
    try:
        await watcher.until(lambda: len(conv.done) >= n, timeout=WAIT)
    except TimeoutError:
        raise Stalled(f"{what}: {len(conv.done):,} of {n:,} in_sync after {WAIT:.0f} s") from None


async def one(
    work: Path, n: int, engine: str = "mosquitto", rollout: str | None = None
) -> dict[str, Any]:
    with Stack(work, n, engine=engine, rollout=rollout) as stack:
        bare = await bare_reference(stack, n)
        setup = await stack.start_controller()
        assert stack.controller is not None
        conv = Convergence(stack.topics)
        watcher = Watcher(
            stack.broker.host,
            stack.broker.port,
            [stack.topics.all_drift(), stack.topics.event("published")],
            parse=conv.parse,
            keep_arrivals=False,
        )
        async with watcher:
            started = time.time()
            pace = ["--connect-rate", CONNECT_RATE[engine]] if engine in CONNECT_RATE else []
            sim = start_sim(
                stack.broker.url, n, "--trust", str(stack.pub), "--prefix", stack.prefix, *pace
            )
            try:
                await wait(watcher, conv, n, "first convergence")
                first = time.time() - started
                conv.reset(2)
                spies = profile(stack, sim)
                cpu0 = cpu_seconds(stack.controller.pid)
                t0 = time.time()
                fleetrepo.bump(stack.repo, group=0, revision=2)
                committed = time.time() - t0
                await wait(watcher, conv, n, "after the commit")
                cpu = cpu_seconds(stack.controller.pid) - cpu0
                for spy in spies:
                    spy.send_signal(2)
                    spy.wait()
                took = max(conv.done.values()) - t0
                curve = sorted(t - t0 for t in conv.done.values())
                footprint = {
                    "controller_rss_mb": round(rss_mb(stack.controller.pid), 1),
                    "broker_rss_mb": round(rss_mb(stack.broker.proc.pid), 1)  # type: ignore[union-attr]
                    if stack.broker.proc
                    else None,
                    "sim_rss_mb": sim.ready["rss_mb"],
                }
                noticed = (conv.published_at - t0) if conv.published_at else None
            finally:
                counters = sim.stop()
        kind = engine if rollout is None else f"{engine}-rollout"
        curve_name = f"converge-{n}.json" if kind == "mosquitto" else f"converge-{kind}-{n}.json"
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        (RESULTS.parent / curve_name).write_text(json.dumps({"n": n, "curve": curve}))
        return {
            "devices": n,
            **({} if rollout is None else {"rollout": rollout}),
            "bare_s": round(bare, 3),
            "converged_s": round(took, 3),
            "ratio": round(took / bare, 2),
            "noticed_s": None if noticed is None else round(noticed, 3),
            "git_commit_s": round(committed, 3),
            "p50_s": round(curve[len(curve) // 2], 3),
            "first_convergence_s": round(first, 3),
            "controller_setup_s": round(setup, 3),
            "controller_cpu_s": round(cpu, 3),
            "sim_connect_rate": sim.ready["connect_rate"],
            "sim_processes": sim.ready.get("processes", 1),
            "reports": counters.get("reports"),
            **footprint,
        }


async def main_async(
    sizes: list[int], quick: bool, engine: str = "mosquitto", rollout: str | None = None
) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench-converge-{n}-") as tmp:
            try:
                row = {"engine": engine, **await one(Path(tmp), n, engine, rollout)}
            except TimeoutError as exc:
                # Recorded, not hidden: the fleet did not converge within the wait.
                row = {"devices": n, "error": f"did not converge: {exc or 'timeout'}"}
        print(f"  {n:,} devices: {row}", flush=True)
        rows.append(row)
    table(
        "Commit to converged (git commit -> last device in_sync on the new version)",
        ["devices", "bare ref s", "setpoint s", "ratio", "p50 s", "noticed s", "ctl RSS MB",
         "broker RSS MB", "sim RSS MB"],
        [[r["devices"], r["bare_s"], r["converged_s"], r["ratio"], r["p50_s"], r["noticed_s"],
          r["controller_rss_mb"], r["broker_rss_mb"], r["sim_rss_mb"]]
         for r in rows if "error" not in r],
    )  # fmt: skip
    name = "converge" if engine == "mosquitto" else f"converge-{engine}"
    record(name if rollout is None else f"{name}-rollout", quick, {"runs": rows})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="mosquitto",
        help="mosquitto (benchmark settings), mosquitto-shipped (mosquitto/setpoint.conf as"
        " shipped), mosquitto-large-fleet (mosquitto/large-fleet.conf), or a 3-node NATS"
        " cluster: nats-cluster (engines/nats-cluster-burst.conf) or nats-cluster-safe"
        " (engines/nats-cluster.conf, survives a node's death)",
    )
    parser.add_argument(
        "--rollout",
        metavar="YAML",
        default=None,
        help="roll the commit out in batches: the group's rollout: as YAML flow text, e.g."
        " '{batch: 10%%}' (docs/rollouts.md; no pause); the simulated devices follow their"
        " pins as shims do",
    )
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.devices, args.quick, args.engine, args.rollout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
