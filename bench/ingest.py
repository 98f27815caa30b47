"""Ingest: how fast the controller takes in device reports, against ``mosquitto_sub``.

    .venv/bin/python -m bench.ingest [--reports 200000] [--devices 10000] [--quick]

The stream: ``--reports`` real reports (``setpoint.proto.reports``, retained, QoS 1) over
``--devices`` device topics, in rounds: every device reports "nothing applied yet" (the
drift engine says ``pending``) and, in the last round, claims a version never published
(``unknown``), so the controller's last drift status marks the end of the stream.

The publisher is not the bottleneck: the whole stream is encoded beforehand and written
with one ``sendall`` from a forked process (PUBACKs drained by a thread), so the broker's
own speed bounds it. Every subscriber gets the same stream (under its own topic prefix), one
after the other on the same broker, in the same run:

* ``mosquitto_sub`` (the C client; the reference);
* bare subscribers (``bench/subscribers.py``): ``aiomqtt``, ``paho`` in a thread,
  ``gmqtt``, ``mqtt5`` (the Rust MQTT 5 codec), ``transport`` / ``transport-311``
  (``setpoint.transport``, MQTT 5 / 3.1.1; decision 0008);
* the controller, full ingest: ``setpoint controller`` with its drift engine (decode,
  detect, publish status changes), timed to the last device's ``unknown`` drift status.

Each rate is reports per second from the first byte sent to the last message handled; the
ratio is against ``mosquitto_sub``. The broker never saves its database during the runs
(``autosave_changes`` out of reach) so that disk writes do not count against anyone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from setpoint.proto import reports
from setpoint.proto.reports import Applied, Report
from setpoint.proto.topics import Topics
from setpoint.sim.running import device_id
from setpoint.transport import raw

from .common import Stack, Watcher, record, rss_mb, spy_on, stop, table

BARE = ("aiomqtt", "aiomqtt-v5", "paho", "mqtt5", "gmqtt", "transport", "transport-311")


def build_stream(prefix: str, devices: int, total: int) -> bytes:
    """``total`` PUBLISH packets (QoS 1, retained) of reports over ``devices`` topics."""
    topics = Topics(prefix)
    rounds = max(1, total // devices)
    now = int(time.time())
    pending, final, names = [], [], []
    for i in range(devices):
        name = device_id(i)
        names.append(topics.device_reported(name))
        base = Report(device=name, time=now, seq=1, shim_version="bench", group="sim-g0")
        pending.append(reports.encode(base))
        claim = Applied("sim-g0", 999_999, "0" * 40, "0" * 64)
        final.append(reports.encode(Report(**{**_fields(base), "seq": 2,
                                              "applied_group": claim})))  # fmt: skip
    messages = (
        (topic, payload, 1, True)
        for r in range(rounds)
        for topic, payload in zip(names, final if r == rounds - 1 else pending, strict=True)
    )
    return raw.publishes(messages)


def _fields(report: Report) -> dict[str, Any]:
    return {f: getattr(report, f) for f in report.__dataclass_fields__}


def _blast(host: str, port: int, stream: bytes, count: int, go: Any, out: Any) -> None:
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(raw.connect(f"bench-blast-{os.getpid()}", keepalive=300))
    connack = sock.recv(4)
    if connack[:1] != b"\x20":
        out.send(("error", f"no CONNACK: {connack!r}"))
        return
    acked = threading.Event()

    def drain() -> None:  # PUBACKs: 4 bytes each
        want, got = 4 * count, 0
        while got < want:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        acked.set()

    threading.Thread(target=drain, daemon=True).start()
    go.wait()
    t0 = time.time()
    sock.sendall(stream)
    sent = time.time()
    acked.wait(300)
    out.send(("ok", (t0, sent, time.time())))
    sock.sendall(raw.disconnect())
    sock.close()


class Blaster:
    """A forked process holding the encoded stream, connected and waiting for ``go``."""

    def __init__(self, host: str, port: int, stream: bytes, count: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.go = ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_blast, args=(host, port, stream, count, self.go, send))
        self.proc.start()

    def fire(self) -> None:
        self.go.set()

    def result(self) -> tuple[float, float, float]:
        status, value = self._recv.recv()
        self.proc.join(10)
        if status != "ok":
            raise RuntimeError(value)
        return value  # type: ignore[no-any-return]


def wait_for_client(log: Path, client_id: str, timeout: float = 10.0) -> None:
    """mosquitto logs each new client: wait for this one, then for its SUBSCRIBE."""
    deadline = time.monotonic() + timeout
    while client_id not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{client_id} did not connect")
        time.sleep(0.01)
    time.sleep(0.3)  # the SUBSCRIBE follows the CONNECT at once; mosquitto does not log it


def run_reference(stack: Stack, devices: int, total: int) -> dict[str, Any]:
    topics = Topics("bench-ingest/mosquitto-sub/v1")
    stream = build_stream(topics.prefix, devices, total)
    blaster = Blaster(stack.broker.host, stack.broker.port, stream, total)
    client_id = f"bench-mosquitto-sub-{os.getpid()}"
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", stack.broker.host, "-p", str(stack.broker.port), "-i", client_id,
         "-q", "0", "-t", topics.all_reported(), "-C", str(total)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_client(stack.broker.log, client_id)
    blaster.fire()
    sub.wait(300)
    last = time.time()
    t0, sent, acked = blaster.result()
    return _row("mosquitto_sub", total, t0, last, sent, acked, total)


def run_bare(stack: Stack, client: str, devices: int, total: int) -> dict[str, Any]:
    topics = Topics(f"bench-ingest/{client}/v1")
    stream = build_stream(topics.prefix, devices, total)
    blaster = Blaster(stack.broker.host, stack.broker.port, stream, total)
    sub = subprocess.Popen(
        [sys.executable, "-m", "bench.subscribers", client, stack.broker.host,
         str(stack.broker.port), topics.all_reported(), str(total)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert sub.stdout is not None
    if sub.stdout.readline().strip() != "subscribed":
        stop(sub)
        raise RuntimeError(f"{client} subscriber did not start")
    blaster.fire()
    result = json.loads(sub.stdout.readline())
    sub.wait(30)
    t0, sent, acked = blaster.result()
    return _row(client, result["count"], t0, result["last"], sent, acked, total)


async def run_controller(stack: Stack, devices: int, total: int) -> dict[str, Any]:
    stream = build_stream(stack.prefix, devices, total)
    blaster = Blaster(stack.broker.host, stack.broker.port, stream, total)
    del stream
    done: dict[str, float] = {}
    seen: set[str] = set()

    def parse(topic: str, payload: bytes) -> None:
        if not payload:
            return
        status = json.loads(payload)
        seen.add(status["device"])
        if status["state"] == "unknown" and status.get("applied_version") == 999_999:
            done.setdefault(status["device"], time.time())

    watcher = Watcher(
        stack.broker.host, stack.broker.port, [stack.topics.all_drift()], parse=parse,
        keep_arrivals=False,
    )  # fmt: skip
    async with watcher:
        await stack.start_controller()
        await watcher.until(lambda: len(seen) >= devices)  # the first full pass is out
        assert stack.controller is not None
        rss_before = rss_mb(stack.controller.pid)
        spy = spy_on(stack.controller.pid, f"ingest-controller-{total}")
        blaster.fire()
        await until_idle(watcher, done, devices)
        if spy is not None:
            spy.send_signal(2)
            spy.wait()
    t0, sent, acked = blaster.result()
    # Devices counted, not reports: the drift engine decodes the latest report of each
    # device (coalescing), so "all devices at their last report" is "all reports taken in".
    handled = total if len(done) >= devices else total * len(done) // devices
    last = max(done.values()) if done else time.time()
    row = _row("controller (full ingest)", handled, t0, last, sent, acked, total)
    row["devices_done"] = len(done)
    row["controller_rss_mb"] = round(rss_mb(stack.controller.pid), 1)
    row["controller_rss_before_mb"] = round(rss_before, 1)
    return row


async def until_idle(watcher: Watcher, done: dict[str, float], want: int, idle: float = 10.0
                     ) -> None:  # fmt: skip
    """Wait until ``want`` devices are done, or none was for ``idle`` seconds (lost)."""
    while len(done) < want:
        before = len(done)
        try:
            await watcher.until(lambda n=before: len(done) > n, timeout=idle if before else 300)
        except TimeoutError:
            return


def show(row: dict[str, Any]) -> dict[str, Any]:
    print(f"  {row['subscriber']}: {row['received']:,} reports in {row['seconds']:.2f} s"
          f" = {row['rate']:,}/s", flush=True)  # fmt: skip
    return row


def _row(name: str, count: int, t0: float, last: float, sent: float, acked: float, total: int
         ) -> dict[str, Any]:  # fmt: skip
    seconds = max(last - t0, 1e-9)
    return {
        "subscriber": name,
        "received": count,
        "seconds": round(seconds, 3),
        "rate": round(count / seconds),
        "publisher_sent_s": round(sent - t0, 3),
        "publisher_acked_s": round(acked - t0, 3),
        "complete": count >= total,
    }


async def main_async(
    devices: int, total: int, clients: list[str], quick: bool, controller: bool = True
) -> dict[str, Any]:
    rows, broker_rss = await measure(devices, total, clients, controller)
    table(
        f"Ingest: {total:,} reports over {devices:,} device topics (reports/s, higher is better)",
        ["subscriber", "reports/s", "ratio", "seconds", "received", "publisher sent s"],
        [[r["subscriber"], r["rate"], r["ratio"], r["seconds"], r["received"],
          r["publisher_sent_s"]] for r in rows],
    )  # fmt: skip
    result = {"devices": devices, "reports": total, "runs": rows, "broker_rss_mb": broker_rss}
    record("ingest", quick, result)
    return result


async def measure(
    devices: int, total: int, clients: list[str], controller: bool = True
) -> tuple[list[dict[str, Any]], float | None]:
    """mosquitto_sub, the bare ``clients`` and (``controller``) the controller on the same
    stream, one after the other on one broker; each row's ratio is against mosquitto_sub.
    Also the broker's RSS at the end."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        stack = Stack(
            Path(tmp), devices, prefix="bench-ingest/controller/v1", autosave_changes=10**9
        )
        # mosquitto drops QoS 0 messages for a client more than max_queued_messages behind
        # (100,000 in setpoint.conf): lift the cap so every subscriber gets the whole stream
        # and the rate measures the subscriber, not the broker's queue (the last setting
        # of an option wins in mosquitto's configuration).
        with stack.broker.conf.open("a", encoding="utf-8") as conf:
            conf.write("\nmax_queued_messages 0\n")
        with stack:
            rows.append(show(run_reference(stack, devices, total)))
            for client in clients:
                rows.append(show(run_bare(stack, client, devices, total)))
            if controller:
                rows.append(show(await run_controller(stack, devices, total)))
            broker_rss = rss_mb(stack.broker.proc.pid) if stack.broker.proc else None
    reference = rows[0]["rate"]
    for row in rows:
        row["ratio"] = round(row["rate"] / reference, 3)
    return rows, broker_rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--clients", nargs="*", default=list(BARE))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--no-controller", action="store_true", help="bare subscribers only (compare libraries)"
    )
    args = parser.parse_args(argv)
    asyncio.run(
        main_async(args.devices, args.reports, args.clients, args.quick, not args.no_controller)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
