"""Does a 3-node NATS cluster keep a retained message published around a node's ``kill -9``?

    .venv/bin/python -m bench.nats_retained [--trials 6] [--kill leader|other] [--delay 0]
    SETPOINT_NATS_SERVER=.venv/bin/nats-server .venv/bin/python -m bench.nats_retained ...

The smallest reproduction of the retained loss of issue 20 (docs/scale-out.md, "Why NATS
loses retained bundles"), one fresh cluster (``engines/nats-cluster.conf``) per trial:

1. a publisher on a node that stays alive publishes ``v1`` retained at QoS 1, and a
   subscriber on node 1 holds it (as the shim does);
2. ``kill -9`` of a node: the leader of ``$MQTT_rmsgs``, the stream of retained messages
   (``--kill leader``), or a node that neither leads it nor carries the publisher
   (``--kill other``);
3. ``--delay`` seconds later the publisher publishes ``v2`` retained at QoS 1 and waits for
   its PUBACK;
4. a fresh subscriber on each surviving node reads the retained message, again and again for
   up to ``--read`` seconds, until every node serves ``v2``.

Each trial ends as ``kept`` (every survivor serves v2), ``lost`` (the stream never stored
v2: every survivor serves v1) or ``stale node`` (the stream holds v2, a node still serves
v1), with the PUBACK time, whether the engine closed the publisher's connection (paho then
sends the PUBLISH again) and whether the publisher's node logged ``unable to store retained
message``. Not a test: what it finds is the engine's behaviour, which differs by
version; the figures go to docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import record, table
from setpoint.engines import NatsCluster, NatsNode
from setpoint.engines.cluster import server_version

RETAINED_STREAM = "$MQTT_rmsgs"
STORE_FAILED = "unable to store retained message"


@contextlib.contextmanager
def connected(url: str, client_id: str, timeout: float = 30.0) -> Iterator[mqtt.Client]:
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    ready = threading.Event()
    client.on_connect = lambda *_: ready.set()
    client.connect(host, int(port))
    client.loop_start()
    try:
        if not ready.wait(timeout):
            raise TimeoutError(f"no CONNACK from {url} within {timeout:.0f}s")
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def read_retained(url: str, topic: str, wait: float = 3.0) -> str | None:
    """What a new QoS 0 subscription on ``url`` is given as the retained message."""
    got: list[str] = []
    arrived = threading.Event()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        got.append(bytes(message.payload).decode(errors="replace"))
        arrived.set()

    try:
        with connected(url, f"reader-{time.monotonic_ns()}", timeout=wait) as client:
            client.on_message = on_message
            client.subscribe(topic, qos=0)
            arrived.wait(wait)
    except (OSError, TimeoutError):
        return None
    return got[0] if got else None


def stream_leader(nodes: list[NatsNode], timeout: float = 30.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for node in nodes:
            state = node.stream(RETAINED_STREAM)
            if state is not None and state.leader:
                return state.leader
        time.sleep(0.2)
    raise TimeoutError(f"no leader of {RETAINED_STREAM} within {timeout:.0f}s")


def trial(work: Path, n: int, kill: str, delay: float, read_for: float) -> dict[str, Any]:
    topic = f"probe{n}/desired"
    with NatsCluster(work / f"trial-{n}") as cluster:
        nodes = cluster.nodes
        with connected(cluster.urls[1], f"first-{n}") as first:
            first.publish(topic, b"v1", qos=1, retain=True).wait_for_publish(30)
        held = threading.Event()
        with connected(cluster.urls[0], f"holder-{n}") as holder:
            holder.on_message = lambda *_: held.set()
            holder.subscribe(topic, qos=1)
            if not held.wait(30):
                raise TimeoutError("the subscriber on n1 never got v1")
            leader = stream_leader(nodes)
            if kill == "leader":
                victim = next(node for node in nodes if node.name == leader)
            else:  # the holder's node (as the shim's) unless it leads the stream
                victim = next(node for node in (nodes[0], nodes[2]) if node.name != leader)
            survivors = [node for node in nodes if node is not victim]
            publisher_node = nodes[1] if victim is not nodes[1] else nodes[2]
            before = publisher_node.stream(RETAINED_STREAM)
            with connected(publisher_node.url, f"publisher-{n}") as publisher:
                reconnects: list[object] = []  # the engine closed the connection; paho resent
                publisher.on_connect = lambda *a: reconnects.append(a)
                victim.kill()
                time.sleep(delay)
                started = time.monotonic()
                info = publisher.publish(topic, b"v2", qos=1, retain=True)
                try:
                    info.wait_for_publish(60)
                    puback: float | None = time.monotonic() - started
                except (RuntimeError, ValueError):
                    puback = None
        served: dict[str, str | None] = {}
        end = time.monotonic() + read_for
        while time.monotonic() < end and not all(served.get(s.name) == "v2" for s in survivors):
            for node in survivors:
                if served.get(node.name) != "v2":
                    served[node.name] = read_retained(node.url, topic)
        states = [node.stream(RETAINED_STREAM) for node in survivors]
        stored = any(
            s is not None and before is not None and s.last_seq > before.last_seq for s in states
        )
        logged = STORE_FAILED in publisher_node.log.read_text(errors="replace")
    if all(v == "v2" for v in served.values()):
        outcome = "kept"
    elif stored:
        outcome = "stale node"
    else:
        outcome = "lost"
    return {
        "trial": n,
        "stream_leader": leader,
        "killed": victim.name,
        "publisher_on": publisher_node.name,
        "puback_s": None if puback is None else round(puback, 2),
        "stored_in_stream": stored,
        "store_failed_logged": logged,
        "publisher_reconnected": bool(reconnects),
        "served": served,
        "outcome": outcome,
    }


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--kill", choices=("leader", "other"), default="leader")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds from kill to publish")
    parser.add_argument("--read", type=float, default=30.0, help="seconds to wait for v2")
    args = parser.parse_args(argv)
    from setpoint.engines import find_nats_server

    version = server_version(find_nats_server())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-nats-retained-") as tmp:
        for n in range(args.trials):
            row = trial(Path(tmp), n, args.kill, args.delay, args.read)
            print(f"  {row}", flush=True)
            rows.append(row)
    table(
        f"nats-server {version}: retained v2 published {args.delay:g}s after kill -9 of the"
        f" {'stream leader' if args.kill == 'leader' else 'other node'}",
        ["trial", "killed", "publisher", "PUBACK s", "resent", "error logged", "stored",
         "outcome"],
        [[r["trial"], r["killed"], r["publisher_on"], r["puback_s"],
          yes(r["publisher_reconnected"]), yes(r["store_failed_logged"]),
          yes(r["stored_in_stream"]), r["outcome"]] for r in rows],
    )  # fmt: skip
    counts = Counter(r["outcome"] for r in rows)
    print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), flush=True)
    record(
        "nats-retained",
        False,
        {"server": version, "kill": args.kill, "delay_s": args.delay, "runs": rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
