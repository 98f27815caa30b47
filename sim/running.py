"""Running simulated devices: connections, pacing, keepalive, faults, several processes.

:func:`run` is what ``setpoint sim`` calls. In one process, :class:`Swarm` owns the event
loop's work for up to a few thousand to ten thousand devices: it opens one MQTT connection
per device at ``connect_rate`` per second (never more than ``window`` handshakes at once),
sends every connection's PINGREQ from one timer (no task per device), injects faults, and
on stop says ``offline`` and disconnects each device cleanly.

:func:`plan` spreads a big fleet. One process holds as many devices as its RLIMIT_NOFILE
allows (raised first: to the hard limit, or past it where the process has
CAP_SYS_RESOURCE, as root usually does); one source address opens as many connections to
the broker as it has local ports (``net.ipv4.ip_local_port_range``, about 28,000 by
default). Past either, :func:`run` forks several processes, binds them to 127.0.0.2,
127.0.0.3, ... (a broker on loopback only), adds up what they report, and says why in the
``ready`` event (``processes``, ``addresses``, ``split``).

What it prints (``--json``: one JSON object per line): ``ready`` once every device is
connected and subscribed (with the connect rate reached and the process's RSS), then
``stopped`` with the counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from setpoint.kit.backoff import Backoff
from setpoint.proto import envelopes
from setpoint.proto.topics import Topics

from . import mqtt
from .devices import Counters, Faults, Fleet, SimDevice, Verifier

FD_MARGIN: Final = 64  # descriptors kept for the loop, logs, pipes
PORT_MARGIN: Final = 1024  # local ports left to the other clients of a source address
TICK: Final = 0.1
SUBSCRIBE_BACKOFF: Final = Backoff(0.5, 30.0)  # between refused subscriptions of a device


@dataclass(frozen=True, slots=True)
class SimConfig:
    host: str
    port: int
    devices: int
    prefix: str = "setpoint/v1"
    first: int = 0
    id_prefix: str = "sim-"
    width: int = 5
    trust: tuple[Path, ...] = ()
    faults: Faults = field(default_factory=Faults)
    connect_rate: float = 2000.0
    window: int = 256
    keepalive: int = 60
    echo: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    duration: float | None = None
    max_per_process: int | None = None
    max_per_address: int | None = None
    source: str | None = None
    seed: int | None = None

    def device_ids(self) -> list[str]:
        end = self.first + self.devices
        return [device_id(i, self.id_prefix, self.width) for i in range(self.first, end)]


def device_id(index: int, id_prefix: str = "sim-", width: int = 5) -> str:
    """The id of simulated device ``index`` (what the fleet repository must list)."""
    return f"{id_prefix}{index:0{width}d}"


def raise_fd_limit(want: int | None = None, pid: int = 0) -> int:
    """Raise RLIMIT_NOFILE of process ``pid`` (0: this one) to ``want`` descriptors, or to
    the hard limit when ``want`` is None; return the soft limit in force.

    Above the hard limit only a process with CAP_SYS_RESOURCE (root, usually) may go, and
    never above ``fs.nr_open``; without it the hard limit is where it stops."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    target = hard if want is None else max(soft, want)
    if target > hard:
        target = min(target, _nr_open())
        with contextlib.suppress(ValueError, OSError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (target, target))
            return target
        target = hard  # not allowed to raise the hard limit: take what there is
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1 << 20


def local_ports() -> int:
    """How many local ports one source address has for connections to one broker port
    (``net.ipv4.ip_local_port_range``)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(high) - int(low) + 1
    except (OSError, ValueError):
        return 28_232  # Linux's default range, 32768-60999


def bind_source(loop: asyncio.AbstractEventLoop, source: str) -> None:
    """Make every TCP connection ``loop`` opens leave from the address ``source``.

    A simulator process uses one source address for all its devices (:func:`plan`). gmqtt
    0.8 opens every socket in ``MQTTConnection.create_connection`` with
    ``loop.create_connection(factory, host, port, ssl=ssl)``: no ``local_addr``, no
    ``sock``, no connection factory a client can be handed. The clean place for a source
    address is the transport (a setting its gmqtt subclass passes on by overriding
    ``Client._create_connection``); until it has one, this process's loop adds
    ``local_addr`` to every call (the simulator opens no other connection)."""
    original = loop.create_connection

    async def create_connection(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("local_addr", (source, 0))
        return await original(*args, **kwargs)

    loop.create_connection = create_connection  # type: ignore[method-assign]


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process in MB (from /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class EchoDevice:
    """The bare reference: answer every message on the desired topic, no setpoint logic."""

    __slots__ = ("conn", "fleet", "id", "topic_desired", "topic_reported")

    def __init__(self, device_id: str, fleet: Fleet) -> None:
        self.id = device_id
        self.fleet = fleet
        self.topic_desired = fleet.topics.device_desired(device_id)
        self.topic_reported = fleet.topics.device_reported(device_id)
        self.conn: mqtt.Connection | None = None

    def will(self) -> None:
        return None

    def connected(self, conn: mqtt.Connection) -> asyncio.Future[list[int]]:
        self.conn = conn
        return conn.subscribe([(self.topic_desired, 1)])

    def on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if payload and self.conn is not None:
            self.conn.publish(self.topic_reported, payload[:8], qos=1, retain=True)
            self.fleet.counters.reports += 1


class Swarm:
    """Simulated devices of one process and their connections."""

    def __init__(self, config: SimConfig, on_ready: Callable[[dict[str, Any]], None]) -> None:
        self.config = config
        self.on_ready = on_ready
        self.rng = random.Random(config.seed)
        verifier = None
        if not config.echo:
            keys = [envelopes.load_public_key(path.read_bytes()) for path in config.trust]
            verifier = Verifier(envelopes.trusted_keys(keys))
        self.fleet = Fleet(Topics(config.prefix), verifier, faults=config.faults, rng=self.rng)
        kind = EchoDevice if config.echo else SimDevice
        self.devices: list[Any] = [kind(d, self.fleet) for d in config.device_ids()]
        self.ready = 0
        self.connected = 0
        self.failures = 0
        self.refusals = 0  # SUBACKs that refused a subscription (asked again after a backoff)
        self.stopping = False
        self._all_ready = asyncio.Event()
        self._window = asyncio.Semaphore(config.window)
        self._pending: set[asyncio.Task[None]] = set()
        self._started = 0.0
        self._ready_at: float | None = None

    # --- Connecting ----------------------------------------------------------------------

    async def _connect(self, device: Any, first: bool) -> None:
        config = self.config
        async with self._window:
            try:
                conn = await mqtt.open_connection(
                    config.host,
                    config.port,
                    device.id,
                    keepalive=config.keepalive,
                    will=device.will(),
                    username=config.username,
                    password=config.password,
                    on_message=device.on_message,
                    on_lost=lambda conn, exc: self._lost(device, conn, exc),
                )
            except (OSError, mqtt.TransportError) as exc:
                self.failures += 1
                if first:
                    source = "" if config.source is None else f" from {config.source}"
                    raise ConnectionError(
                        f"{device.id}: cannot connect to {config.host}:{config.port}{source}: {exc}"
                    ) from exc
                self._later(device)
                return
        self._subscribe(device, conn, first, 0)

    def _subscribe(self, device: Any, conn: mqtt.Connection, first: bool, attempt: int) -> None:
        subscribed = device.connected(conn)
        if subscribed is not None:
            subscribed.add_done_callback(
                lambda future: self._subscribed(device, conn, first, attempt, future)
            )

    def _subscribed(
        self, device: Any, conn: mqtt.Connection, first: bool, attempt: int, future: Any
    ) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if isinstance(error, mqtt.SubscriptionRefused):
            # A clustered broker refuses while it creates the subscription (NATS: SUBACK
            # 0x80 under a burst of connects); ask again after the kit's backoff.
            if not self.stopping and conn.connected:
                self.refusals += 1
                delay = SUBSCRIBE_BACKOFF.delay(attempt, self.rng)
                asyncio.get_running_loop().call_later(
                    delay, self._resubscribe, device, conn, first, attempt + 1
                )
            return
        if error is not None or not first:
            return
        self.ready += 1
        if self.ready == len(self.devices):
            self._ready_at = time.monotonic()
            self._all_ready.set()

    def _resubscribe(self, device: Any, conn: mqtt.Connection, first: bool, attempt: int) -> None:
        if not self.stopping and device.conn is conn and conn.connected:
            self._subscribe(device, conn, first, attempt)

    def _lost(self, device: Any, conn: mqtt.Connection, exc: Exception | None) -> None:
        if device.conn is conn:
            device.conn = None
        if not self.stopping:  # churn, or the broker went away: come back later
            self._later(device)

    def _later(self, device: Any) -> None:
        if self.stopping:
            return
        low, high = self.config.faults.offline_for
        asyncio.get_running_loop().call_later(
            self.rng.uniform(low, high), self._spawn, device, False
        )

    def _spawn(self, device: Any, first: bool) -> None:
        if self.stopping:
            return
        task = asyncio.get_running_loop().create_task(self._connect(device, first))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def connect_all(self) -> float:
        """Open every connection at the configured rate; return connections per second."""
        self._started = time.monotonic()
        rate = self.config.connect_rate
        tasks = []
        for i, device in enumerate(self.devices):
            due = self._started + i / rate if rate > 0 else 0.0
            delay = due - time.monotonic()
            if delay > 0.002:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(self._connect(device, True)))
        await asyncio.gather(*tasks)
        await self._all_ready.wait()
        assert self._ready_at is not None
        took = max(self._ready_at - self._started, 1e-6)
        return len(self.devices) / took

    # --- Running -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> Counters:
        if self.config.source is not None:
            bind_source(asyncio.get_running_loop(), self.config.source)
        rate = await self.connect_all()
        self.on_ready(
            {
                "event": "ready",
                "devices": len(self.devices),
                "seconds": round(len(self.devices) / rate, 3),
                "connect_rate": round(rate, 1),
                "rss_mb": round(rss_mb(), 1),
                "pid": os.getpid(),
            }
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._keepalive(stop), name="sim-keepalive")
                tg.create_task(self._faults(stop), name="sim-faults")
                await stop.wait()
        finally:
            await self.close()
        return self.fleet.counters

    async def _keepalive(self, stop: asyncio.Event) -> None:
        """PINGREQ every connection each keepalive/2 seconds, in slices from one timer."""
        period = max(1.0, self.config.keepalive / 2)
        step = max(1, int(len(self.devices) * TICK * 5 / period) + 1)
        index = 0
        while not stop.is_set():
            await asyncio.sleep(TICK * 5)
            for device in self.devices[index : index + step]:
                if device.conn is not None:
                    device.conn.ping()
            index = (index + step) % max(1, len(self.devices))

    async def _faults(self, stop: asyncio.Event) -> None:
        faults = self.fleet.faults
        if self.config.echo or not (faults.drift or faults.churn):
            return
        loop = asyncio.get_running_loop()
        drift_due = churn_due = 0.0
        while not stop.is_set():
            await asyncio.sleep(TICK)
            drift_due += faults.drift * TICK
            churn_due += faults.churn * TICK
            while drift_due >= 1:
                drift_due -= 1
                device = self.rng.choice(self.devices)
                if device.drift() and device.mode == "enforce":
                    loop.call_later(faults.heal_after, device.heal)
            while churn_due >= 1:
                churn_due -= 1
                device = self.rng.choice(self.devices)
                if device.conn is not None:
                    device.conn.abort()  # no DISCONNECT: the broker publishes the will

    async def close(self) -> None:
        """Say offline and disconnect cleanly, as a shim does when stopped."""
        self.stopping = True
        for task in list(self._pending):
            task.cancel()
        for device in self.devices:
            conn = device.conn
            if conn is None:
                continue
            if not self.config.echo:
                conn.publish(device.topic_presence, b"offline", qos=1, retain=True)
            conn.disconnect()
        await asyncio.sleep(0)  # let the transports flush and close


# --- Processes -----------------------------------------------------------------------------


def _shard_main(config: SimConfig, queue: Any) -> None:
    """A child process: run its share of devices until SIGTERM."""
    raise_fd_limit(config.devices + FD_MARGIN)

    async def main() -> Counters:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if config.duration is not None:
            loop.call_later(config.duration, stop.set)
        swarm = Swarm(config, lambda info: queue.put(info))
        return await swarm.run(stop)

    try:
        counters = asyncio.run(main())
        queue.put({"event": "stopped", **asdict(counters), "pid": os.getpid()})
    except BaseException as exc:
        queue.put({"event": "error", "error": f"{type(exc).__name__}: {exc}", "pid": os.getpid()})
        raise


@dataclass(frozen=True, slots=True)
class Plan:
    """How a fleet is spread: processes (each under its descriptor limit), each on one
    source address (each under its number of local ports), and why."""

    parts: tuple[SimConfig, ...]
    per_process: int
    per_address: int
    why: str

    @property
    def addresses(self) -> list[str | None]:
        return list(dict.fromkeys(p.source for p in self.parts))


class TooManyDevices(ValueError):
    """The fleet needs more source addresses than the broker's host allows."""


def per_process(config: SimConfig) -> tuple[int, str]:
    """Devices one process may hold and, when that is a limit, why."""
    limit = raise_fd_limit(config.devices + FD_MARGIN) - FD_MARGIN
    why = ""
    if limit < config.devices:
        why = (
            f"RLIMIT_NOFILE is {limit + FD_MARGIN:,} (its hard limit; raising it needs"
            " CAP_SYS_RESOURCE)"
        )
    if config.max_per_process is not None and config.max_per_process < max(limit, 1):
        limit, why = config.max_per_process, f"--max-per-process {config.max_per_process:,}"
    return max(1, limit), why


def per_address(config: SimConfig) -> tuple[int, str]:
    """Connections one source address may open to the broker and, if a limit, why."""
    ports = local_ports()
    limit = max(1, ports - PORT_MARGIN)
    why = f"{ports:,} local ports per source address" if limit < config.devices else ""
    if config.max_per_address is not None and config.max_per_address < limit:
        limit, why = config.max_per_address, f"--max-per-address {config.max_per_address:,}"
    return limit, why


def source_address(host: str, index: int) -> str | None:
    """The ``index``-th source address: the kernel's choice first, then 127.0.0.2, 127.0.0.3
    and so on, which reach a broker on loopback (all of 127/8 is the loopback device)."""
    if index == 0:
        return None
    if not host.startswith("127.") and host != "localhost":
        raise TooManyDevices(
            f"the fleet needs {index + 1} source addresses, and extra ones are made only on"
            f" loopback; the broker is at {host}: run fewer devices per simulator"
            " (--devices) and several simulators"
        )
    if index > 253:
        raise TooManyDevices(
            f"the fleet needs {index + 1} source addresses; 127.0.0.1-127.0.0.254 is as far as"
            " the simulator goes: run fewer devices (--devices) or raise --max-per-address"
        )
    return f"127.0.0.{index + 1}"


def plan(config: SimConfig) -> Plan:
    """Split the fleet over source addresses (each under its local ports) and processes
    (each under the descriptor limit, raised first as far as allowed)."""
    proc_size, proc_why = per_process(config)
    addr_size, addr_why = per_address(config)
    out: list[SimConfig] = []
    first, left, address = config.first, config.devices, 0
    while left:
        on_address = min(left, addr_size)
        count = -(-on_address // proc_size)
        base, extra = divmod(on_address, count)
        source = config.source if address == 0 else source_address(config.host, address)
        for i in range(count):
            n = base + (1 if i < extra else 0)
            seed = None if config.seed is None else config.seed + len(out)
            out.append(replace(config, first=first, devices=n, seed=seed, source=source))
            first += n
        left -= on_address
        address += 1
    why = "; ".join(w for w in (proc_why, addr_why) if w)
    return Plan(tuple(out), proc_size, addr_size, why)


def shards(config: SimConfig) -> list[SimConfig]:
    """The processes of :func:`plan`."""
    return list(plan(config).parts)


def run(config: SimConfig, emit: Callable[[dict[str, Any]], None]) -> int:
    """Run the fleet (one or more processes) until SIGTERM/SIGINT or ``duration``."""
    layout = plan(config)
    parts = list(layout.parts)
    spread = {
        "processes": len(parts),
        "addresses": [a or "default" for a in layout.addresses],
        "split": layout.why,
    }
    if len(parts) == 1:
        return _run_here(
            parts[0], lambda info: emit({**info, **spread} if info["event"] == "ready" else info)
        )
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_shard_main, args=(p, queue), daemon=True) for p in parts]
    started = time.monotonic()
    for proc in procs:
        proc.start()

    def forward(sig: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ready, stopped, rss, code = 0, 0, 0.0, 0
        totals = Counters()
        while stopped < len(procs):
            info = queue.get()
            if info["event"] == "ready":
                ready += 1
                rss += info["rss_mb"]
                if ready == len(procs):
                    took = time.monotonic() - started
                    emit(
                        {
                            "event": "ready",
                            "devices": config.devices,
                            "seconds": round(took, 3),
                            "connect_rate": round(config.devices / took, 1),
                            "rss_mb": round(rss, 1),
                            **spread,
                        }
                    )
            elif info["event"] == "stopped":
                stopped += 1
                for key, value in info.items():
                    if hasattr(totals, key):
                        setattr(totals, key, getattr(totals, key) + value)
            elif info["event"] == "error":
                stopped += 1
                code = 1
                emit(info)
                forward(signal.SIGTERM, None)
        emit({"event": "stopped", **asdict(totals)})
        return code
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for proc in procs:
            proc.join(5)


def _run_here(config: SimConfig, emit: Callable[[dict[str, Any]], None]) -> int:
    async def main() -> Counters:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if config.duration is not None:
            loop.call_later(config.duration, stop.set)
        return await Swarm(config, emit).run(stop)

    counters = asyncio.run(main())
    emit({"event": "stopped", **asdict(counters)})
    return 0


def printer(as_json: bool) -> Callable[[dict[str, Any]], None]:
    def emit(info: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps(info, sort_keys=True), flush=True)
        elif info["event"] == "ready":
            print(
                f"sim: {info['devices']} devices connected and subscribed in"
                f" {info['seconds']:.2f}s ({info['connect_rate']:.0f}/s),"
                f" RSS {info['rss_mb']:.0f} MB",
                flush=True,
            )
            if info.get("split"):
                print(
                    f"sim: spread over {info['processes']} processes and"
                    f" {len(info['addresses'])} source addresses ({info['split']})",
                    flush=True,
                )
        elif info["event"] == "error":
            print(f"sim: error: {info['error']}", file=sys.stderr, flush=True)
        else:
            fields = ", ".join(f"{k} {v}" for k, v in info.items() if k != "event")
            print(f"sim: stopped ({fields})", flush=True)

    return emit
