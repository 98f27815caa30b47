"""What every benchmark shares: the machine, results, a watcher, processes to start.

* :func:`record` appends one JSON line to ``bench/results/results.jsonl`` (with the machine
  and the git commit) and :func:`table` prints a table.
* :class:`Stack` starts a private mosquitto, a signing key, a fleet repository of simulated
  devices and a real controller (``setpoint controller``, drift engine included), and waits
  until every bundle is retained.
* :class:`Watcher` is one MQTT connection (``setpoint.sim.mqtt``, on the transport) that
  records what arrives on the topics it is given, with arrival times, and lets a benchmark
  wait for a condition without sleeping.
* :func:`start_sim` runs ``setpoint sim`` and waits for its ``ready`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from setpoint.commands import keys
from setpoint.engines import NatsCluster
from setpoint.mosquitto import Broker
from setpoint.mosquitto.broker import end_process
from setpoint.proto.topics import Topics
from setpoint.sim import fleetrepo, mqtt

ROOT = Path(__file__).resolve().parent.parent
# BENCH_RESULTS=DIR puts every result file elsewhere (the tests do, to keep the tree clean).
RESULTS = Path(os.environ.get("BENCH_RESULTS") or ROOT / "bench" / "results") / "results.jsonl"
BIN = Path(sys.executable).parent
SETPOINT = str(BIN / "setpoint")
# The shim's defaults before it watched with inotify: the "before" of bench.footprint and
# bench.device_drift (``--poll``).
SHIM_POLL_FLAGS = ("--no-watch", "--observe-interval", "5")


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_mb": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mosquitto": _mosquitto_version(),
    }


def _mosquitto_version() -> str:
    from setpoint.mosquitto.broker import find_mosquitto

    with contextlib.suppress(Exception):
        out = subprocess.run(
            [find_mosquitto(), "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        return out.splitlines()[0].strip()
    return "?"


def git_commit() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return "?"


def record(name: str, quick: bool, results: dict[str, Any]) -> dict[str, Any]:
    entry = {
        "bench": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": quick,
        "commit": git_commit(),
        "machine": machine(),
        **results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
    return entry


def table(title: str, headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = [f"\n{title}", "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --- Processes ----------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 20.0) -> None:
    end_process(proc, timeout=timeout, hard=False)


@dataclass
class Sim:
    proc: subprocess.Popen[str]
    ready: dict[str, Any]

    def stop(self) -> dict[str, Any]:
        stop(self.proc)
        assert self.proc.stdout is not None
        last: dict[str, Any] = {}
        for line in self.proc.stdout.read().splitlines():
            with contextlib.suppress(ValueError):
                last = json.loads(line)
        return last


def start_sim(url: str, devices: int, *args: str, timeout: float = 120.0) -> Sim:
    proc = subprocess.Popen(
        [SETPOINT, "sim", "--broker", url, "--devices", str(devices), "--json", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    if not line or time.monotonic() > deadline:
        stop(proc)
        raise RuntimeError(f"setpoint sim did not get ready (exit {proc.poll()})")
    info = json.loads(line)
    if info.get("event") != "ready":
        stop(proc)
        raise RuntimeError(f"setpoint sim: {info}")
    return Sim(proc, info)


# --- Watching -------------------------------------------------------------------------------


@dataclass
class Watcher:
    """One lean MQTT connection recording what arrives, with ``time.time()`` stamps."""

    host: str
    port: int
    filters: list[str]
    parse: Callable[[str, bytes], Any] | None = None
    arrivals: list[tuple[float, str, Any]] = field(default_factory=list)
    latest: dict[str, Any] = field(default_factory=dict)
    keep_arrivals: bool = True
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _conn: mqtt.Connection | None = None

    def _message(self, topic: str, payload: bytes, retain: bool) -> None:
        value = self.parse(topic, payload) if self.parse is not None else payload
        if self.keep_arrivals:
            self.arrivals.append((time.time(), topic, value))
        self.latest[topic] = value
        self._changed.set()

    async def __aenter__(self) -> Watcher:
        self._conn = await mqtt.open_connection(
            self.host, self.port, f"bench-watch-{os.getpid()}-{secrets.token_hex(3)}",
            on_message=self._message, keepalive=0,  # no PINGREQ timer: no keepalive
        )  # fmt: skip
        await self._conn.subscribe([(f, 0) for f in self.filters])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.disconnect()

    async def until(self, condition: Callable[[], bool], timeout: float = 300.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


def drift_of(topic: str, payload: bytes) -> dict[str, Any] | None:
    return json.loads(payload) if payload else None


# --- A whole stack: broker, key, repository, controller -----------------------------------


class ClusterBroker:
    """A 3-node NATS cluster seen as one broker by the benchmarks: the devices and the
    watchers use node 1, the controller node 2, so every bundle and report crosses the
    cluster's routes. ``nats-cluster`` is ``engines/nats-cluster-burst.conf`` (consumers in
    memory on one node); ``nats-cluster-safe`` the fault-tolerant ``nats-cluster.conf``,
    which refuses many of 1,000 simultaneous QoS 1 subscriptions (SUBACK 0x80) at first: the
    simulator asks again after a backoff, as the shim does."""

    host = "127.0.0.1"

    def __init__(self, work: Path, template: str = "nats-cluster-burst.conf") -> None:
        self.cluster = NatsCluster(work, template=template)

    @property
    def port(self) -> int:
        return self.cluster.nodes[0].mqtt_port

    @property
    def url(self) -> str:
        return self.cluster.urls[0]

    @property
    def controller_url(self) -> str:
        return self.cluster.urls[1]

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.cluster.nodes[0].proc

    def start(self) -> ClusterBroker:
        self.cluster.start()
        return self

    def close(self) -> None:
        self.cluster.close()


# mosquitto: benchmark settings (the retained database saved every 100,000 changes);
# mosquitto-shipped: the project's mosquitto/setpoint.conf as shipped (saved after every
# change, so a kill -9 loses nothing acknowledged); mosquitto-large-fleet:
# mosquitto/large-fleet.conf as shipped (saved once a second).
ENGINES = (
    "mosquitto",
    "mosquitto-shipped",
    "mosquitto-large-fleet",
    "nats-cluster",
    "nats-cluster-safe",
)


class Stack:
    """mosquitto (or a NATS cluster) + key + a repository of ``devices`` simulated devices
    + a controller."""

    def __init__(
        self,
        work: Path,
        devices: int,
        *,
        groups: int = 1,
        prefix: str = "setpoint/v1",
        autosave_changes: int = 100_000,
        engine: str = "mosquitto",
        rollout: str | None = None,
    ) -> None:
        self.work, self.devices, self.groups = work, devices, groups
        self.rollout = rollout  # the groups' ``rollout:`` (batches), YAML flow text
        self.prefix = prefix
        self.topics = Topics(prefix)
        self.broker: Broker | ClusterBroker
        if engine in ("nats-cluster", "nats-cluster-safe"):
            template = "nats-cluster.conf" if engine == "nats-cluster-safe" else None
            self.broker = ClusterBroker(work / "nats", *([template] if template else []))
            self.controller_url = self.broker.controller_url
        elif engine == "mosquitto-shipped":
            self.broker = Broker(work / "broker")
            self.controller_url = self.broker.url
        elif engine == "mosquitto-large-fleet":
            self.broker = Broker(work / "broker", template="large-fleet.conf")
            self.controller_url = self.broker.url
        else:
            # Saving the retained database after every change (the default for safety)
            # would make the broker write megabytes per message at this scale.
            self.broker = Broker(work / "broker", autosave_changes=autosave_changes)
            self.controller_url = self.broker.url
        self.controller: subprocess.Popen[bytes] | None = None
        self.repo = work / "repo"
        self.pub = work / "keys" / keys.PUBLIC_NAME

    def __enter__(self) -> Stack:
        keys.generate(self.work / "keys")
        if self.devices:
            fleetrepo.create(self.repo, self.devices, groups=self.groups, rollout=self.rollout)
        self.broker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.controller)
        self.broker.close()

    async def start_controller(self, *extra: str, timeout: float = 300.0) -> float:
        """Start the controller and wait until every bundle is retained; return seconds."""
        started = time.monotonic()
        watcher = Watcher(
            self.broker.host,
            self.broker.port,
            [self.topics.all_device_desired(), self.topics.all_group_desired()],
            keep_arrivals=False,
        )
        async with watcher:
            self.controller = subprocess.Popen(
                [SETPOINT, "controller", "--repo", str(self.repo), "--broker", self.controller_url,
                 "--key", str(self.work / "keys" / keys.PRIVATE_NAME), "--prefix", self.prefix,
                 "--state-dir", str(self.work / "state"), "--log-level", "WARNING", *extra],
                stderr=open(self.work / "controller.log", "wb"),  # noqa: SIM115
            )  # fmt: skip
            want = self.devices + self.groups
            await watcher.until(lambda: len(watcher.latest) >= want, timeout)
        return time.monotonic() - started


def spy_on(pid: int, name: str) -> subprocess.Popen[bytes] | None:
    """With BENCH_PROFILE=DIR, a py-spy recording (collapsed stacks) of ``pid``."""
    where = os.environ.get("BENCH_PROFILE")
    if not where:
        return None
    Path(where).mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [str(BIN / "py-spy"), "record", "--format", "raw", "-o", f"{where}/{name}.txt",
         "-p", str(pid), "-r", "200", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)  # attaching
    return spy


@contextlib.contextmanager
def sampling(pid: int, every: float = 0.05) -> Iterator[list[float]]:
    """Sample a process's RSS in a thread while the block runs (the peak is ``max``)."""
    import threading

    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            samples.append(rss_mb(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()
