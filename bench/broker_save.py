"""How often mosquitto saves its retained database: the update rate it allows, and what a
``kill -9`` loses.

    .venv/bin/python -m bench.broker_save [--retained 10000] [--seconds 5] [--kills 3] [--quick]

For each setting (saved after every change, as ``mosquitto/setpoint.conf`` ships; every
1,000 changes; once a second, as ``mosquitto/large-fleet.conf`` ships):

1. a broker is filled with ``--retained`` retained messages of 700 bytes (the size of a
   signed group bundle; a fleet of that many devices), then stopped cleanly (saved);
2. started again with the setting, it takes QoS 1 retained updates over those topics, 100 in
   flight, for ``--seconds``: **updates/s** is the acknowledgements per second;
3. still under load (after ``--seconds`` plus 0-1 s, so that the kills fall at other points
   of the save cycle), it is killed with SIGKILL, started again, and every retained message
   is read back. Each update carries its sequence number, so the newest update that
   survived is known: **lost** is the number of acknowledged updates newer than it, and the
   **loss window** the time from its acknowledgement to the kill.

Writes ``bench/results/broker-save.json`` and a line in ``results.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from setpoint.mosquitto import Broker
from setpoint.proto.topics import Topics
from setpoint.sim import mqtt

from .common import RESULTS, Watcher, record, table

PAYLOAD = 700
WINDOW = 100  # mosquitto's max_inflight_messages: the receive maximum it grants
TOPICS = Topics("bench-save/v1")


@dataclass(frozen=True)
class Setting:
    name: str
    template: str
    autosave_changes: int

    def broker(self, directory: Path) -> Broker:
        return Broker(directory, template=self.template, autosave_changes=self.autosave_changes)


SETTINGS = (
    Setting("every change (setpoint.conf)", "setpoint.conf", 1),
    Setting("every 1,000 changes", "setpoint.conf", 1000),
    Setting("every second (large-fleet.conf)", "large-fleet.conf", 1),
)


def payload(seq: int) -> bytes:
    return f"{seq:012d}".encode().ljust(PAYLOAD, b".")


def topic(index: int) -> str:
    return TOPICS.device_reported(f"sim-{index:06d}")


async def fill(broker: Broker, retained: int) -> None:
    conn = await mqtt.open_connection(broker.host, broker.port, "bench-save-fill")
    acks = [
        await conn.session.publish(topic(i), payload(0), qos=1, retain=True)
        for i in range(retained)
    ]
    await asyncio.gather(*acks)
    conn.disconnect()


async def load(broker: Broker, retained: int, seconds: float) -> tuple[list[float], float]:
    """Retained updates, as many in flight as the broker allows (its receive maximum, 100 in
    the shipped configurations), for ``seconds``; then kill -9 under load. Return the
    acknowledgement time of every update (index = sequence - 1) and the kill."""
    conn = await mqtt.open_connection(broker.host, broker.port, "bench-save-load")
    acked: dict[int, float] = {}

    def done(seq: int, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is None:
            acked[seq] = time.time()

    seq = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seq += 1
        future = await conn.session.publish(
            topic(seq % retained), payload(seq), qos=1, retain=True
        )  # returns once written, waiting for room among the unacknowledged
        future.add_done_callback(lambda f, s=seq: done(s, f))
    broker.kill()
    killed = time.time()
    conn.abort()
    await asyncio.sleep(0.1)
    return [acked.get(s, 0.0) for s in range(1, seq + 1)], killed


async def newest_kept(broker: Broker, retained: int) -> int:
    """The highest sequence number among the retained messages after a restart."""
    watcher = Watcher(broker.host, broker.port, [TOPICS.all_reported()], keep_arrivals=False)
    async with watcher:
        await watcher.until(lambda: len(watcher.latest) >= retained, timeout=120)
    return max(int(value[:12]) for value in watcher.latest.values())


async def one(setting: Setting, work: Path, retained: int, seconds: float) -> dict[str, Any]:
    first = Broker(work, autosave_changes=100_000).start()
    await fill(first, retained)
    first.stop()  # a clean stop saves the database
    broker = setting.broker(work).start()
    try:
        started = time.time()
        acks, killed = await load(broker, retained, seconds + random.uniform(0, 1))
        took = killed - started
        broker.start()
        kept = await newest_kept(broker, retained)
    finally:
        broker.close()
    acknowledged = [(seq, at) for seq, at in enumerate(acks, 1) if at]
    lost = [seq for seq, _ in acknowledged if seq > kept]
    kept_at = acks[kept - 1] if 0 < kept <= len(acks) else started
    db = (work / "mosquitto.db").stat().st_size if (work / "mosquitto.db").exists() else 0
    return {
        "setting": setting.name,
        "template": setting.template,
        "autosave_changes": setting.autosave_changes,
        "retained": retained,
        "db_mb": round(db / 1e6, 2),
        "updates": len(acknowledged),
        "updates_per_s": round(len(acknowledged) / took, 1),
        "lost_updates": len(lost),
        "loss_window_s": round(killed - kept_at, 3) if lost else 0.0,
    }


async def main_async(
    retained: int, seconds: float, kills: int, quick: bool
) -> list[dict[str, Any]]:
    rows = []
    for setting in SETTINGS:
        runs = []
        for _ in range(kills):  # the kill falls at another point of the save cycle each time
            with tempfile.TemporaryDirectory(prefix="bench-save-") as tmp:
                runs.append(await one(setting, Path(tmp), retained, seconds))
            print(f"  {runs[-1]}", flush=True)
        rows.append(
            {
                **runs[0],
                "kills": kills,
                "updates_per_s": round(sum(r["updates_per_s"] for r in runs) / kills, 1),
                "lost_updates": max(r["lost_updates"] for r in runs),
                "loss_window_s": max(r["loss_window_s"] for r in runs),
                "runs": runs,
            }
        )
    table(
        f"Retained database saves: {retained:,} retained messages, QoS 1 retained updates,"
        f" {WINDOW} in flight, then kill -9 under load ({kills} kills each)",
        ["saved after", "DB MB", "updates/s (mean)", "acked, lost at kill -9 (max)",
         "loss window s (max)"],
        [[r["setting"], r["db_mb"], r["updates_per_s"], r["lost_updates"], r["loss_window_s"]]
         for r in rows],
    )  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    (RESULTS.parent / "broker-save.json").write_text(json.dumps(rows, indent=1) + "\n")
    record("broker_save", quick, {"retained": retained, "seconds": seconds, "settings": rows})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retained", type=int, default=10_000, help="retained messages")
    parser.add_argument("--seconds", type=float, default=5.0, help="load before the kill")
    parser.add_argument("--kills", type=int, default=3, help="runs (kills) per setting")
    parser.add_argument("--quick", action="store_true", help="2,000 retained, 2 s, one kill")
    args = parser.parse_args(argv)
    if args.quick:
        args.retained, args.seconds, args.kills = 2000, 2.0, 1
    asyncio.run(main_async(args.retained, args.seconds, args.kills, args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
