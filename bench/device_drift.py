"""Hand edit on a device -> drift event at the controller, and -> healed, end to end.

    .venv/bin/python -m bench.device_drift [--edits 100] [--quick] [--poll]

A private mosquitto, a real controller and two real ``setpoint shim`` processes run with
their default flags (``--poll``: the old way, ``--no-watch --observe-interval 5``): one
device of an ``observe`` group, one of an ``enforce`` group. Each round edits ``etc/motd``
by hand (an append, as ``echo >> etc/motd`` would) and measures, with one clock:

* **observe**: edit -> the controller's ``drift`` event (``in_sync`` -> ``drifted``) at a
  subscriber; then the edit is undone and the round waits for the event back to ``in_sync``;
* **enforce**: edit -> the file is put back on disk (the shim's heal, seen by this process
  through inotify), edit -> the ``drift`` event, and edit -> the event back to ``in_sync``
  (the controller has the healed report).

Prints p50, p99 and max of each over ``--edits`` rounds (quick: 20).
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

from .common import SETPOINT, SHIM_POLL_FLAGS, Stack, Watcher, percentile, record, stop, table

OBSERVE, ENFORCE = "sim-00001", "sim-00000"  # groups sim-g1 (observe) and sim-g0 (enforce)


def _hand_edit(path: Path, n: int) -> float:
    """Append a line to ``path``, as ``echo >> path`` would; the time just before."""
    t0 = time.time()
    with path.open("ab") as fh:
        fh.write(b"# edited by hand %d\n" % n)
    return t0


def _event(topic: str, payload: bytes) -> dict[str, Any] | None:
    return json.loads(payload) if payload else None


async def _restored(path: Path, content: bytes, timeout: float) -> float:
    """When ``path`` holds ``content`` again: watched with inotify, like the shim does."""
    import inotify_simple

    with inotify_simple.INotify() as ino:
        ino.add_watch(str(path.parent), inotify_simple.masks.ALL_EVENTS)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if path.read_bytes() == content:
                    return time.time()
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} was not put back")
            await asyncio.to_thread(ino.read, 100)


async def main_async(edits: int, quick: bool, poll: bool) -> dict[str, Any]:
    flags = SHIM_POLL_FLAGS if poll else ()
    timeout = 30.0
    with (
        tempfile.TemporaryDirectory(prefix="bench-device-drift-") as tmp,
        Stack(Path(tmp), 2, groups=2) as stack,
    ):
        await stack.start_controller()
        events = stack.topics.event("drift")
        drift = [stack.topics.device_drift(d) for d in (OBSERVE, ENFORCE)]
        watcher = Watcher(stack.broker.host, stack.broker.port, [events, *drift], parse=_event)
        async with watcher:
            shims, roots = [], {}
            for device in (OBSERVE, ENFORCE):
                roots[device] = Path(tmp) / device
                roots[device].mkdir()
                args = [
                    SETPOINT, "shim", "--device", device, "--broker", stack.broker.url,
                    "--trust", str(stack.pub), "--root", str(roots[device]),
                    "--state-dir", str(Path(tmp) / f"{device}-state"),
                    "--log-level", "WARNING", *flags,
                ]  # fmt: skip
                shims.append(subprocess.Popen(args))
            try:

                def in_sync() -> bool:
                    states = [(watcher.latest.get(t) or {}).get("state") for t in drift]
                    return states == ["in_sync", "in_sync"]

                await watcher.until(in_sync, 120)
                await asyncio.sleep(1.0)  # the first reports and looks settle

                async def event_for(device: str, state: str, after: int) -> float:
                    def arrived() -> float | None:
                        for at, topic, value in watcher.arrivals[after:]:
                            if (
                                topic == events
                                and value
                                and (value.get("device"), value.get("state")) == (device, state)
                            ):
                                return at
                        return None

                    await watcher.until(lambda: arrived() is not None, timeout)
                    at = arrived()
                    assert at is not None
                    return at

                async def one_round(device: str, i: int) -> tuple[float, float, float]:
                    """Seconds from the edit to the drift event, to the file put back
                    (enforce only), to the event back to in_sync."""
                    motd = roots[device] / "etc" / "motd"
                    mark = len(watcher.arrivals)
                    t0 = _hand_edit(motd, i)
                    healed = float("nan")
                    if device == ENFORCE:
                        healed = await _restored(motd, originals[device], timeout) - t0
                    drifted = await event_for(device, "drifted", mark) - t0
                    if device == OBSERVE:
                        motd.write_bytes(originals[device])  # undone by hand
                    back = await event_for(device, "in_sync", mark) - t0
                    return drifted, healed, back

                originals = {d: (roots[d] / "etc" / "motd").read_bytes() for d in roots}
                observe = [(await one_round(OBSERVE, i))[0] for i in range(edits)]
                enforce = [await one_round(ENFORCE, i) for i in range(edits)]
                to_event = [r[0] for r in enforce]
                to_disk = [r[1] for r in enforce]
                to_resolved = [r[2] for r in enforce]
            finally:
                for shim in shims:
                    stop(shim)

    def ms(values: list[float], q: float) -> float:
        return round(1000 * percentile(values, q), 1)

    result = {
        "edits": edits,
        "shim_flags": " ".join(flags) or "defaults",
        "observe_edit_to_event_p50_ms": ms(observe, 0.5),
        "observe_edit_to_event_p99_ms": ms(observe, 0.99),
        "observe_edit_to_event_max_ms": ms(observe, 1.0),
        "enforce_edit_to_event_p50_ms": ms(to_event, 0.5),
        "enforce_edit_to_event_p99_ms": ms(to_event, 0.99),
        "enforce_edit_to_healed_on_disk_p50_ms": ms(to_disk, 0.5),
        "enforce_edit_to_healed_on_disk_p99_ms": ms(to_disk, 0.99),
        "enforce_edit_to_in_sync_p50_ms": ms(to_resolved, 0.5),
        "enforce_edit_to_in_sync_p99_ms": ms(to_resolved, 0.99),
        "enforce_edit_to_in_sync_max_ms": ms(to_resolved, 1.0),
    }
    table(
        f"Hand edit on a device, {edits} edits, shim {result['shim_flags']} (ms)",
        ["from the edit to", "p50", "p99", "max"],
        [
            ["drift event (observe group)", *(ms(observe, q) for q in (0.5, 0.99, 1.0))],
            ["drift event (enforce group)", *(ms(to_event, q) for q in (0.5, 0.99, 1.0))],
            ["file put back on disk (enforce)", *(ms(to_disk, q) for q in (0.5, 0.99, 1.0))],
            ["in_sync event again (enforce)", *(ms(to_resolved, q) for q in (0.5, 0.99, 1.0))],
        ],
    )
    record("device_drift" + ("_poll" if poll else ""), quick, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, help="rounds (default 100; quick: 20)")
    parser.add_argument("--quick", action="store_true", help="20 rounds")
    parser.add_argument("--poll", action="store_true", help="shims without inotify, 5 s polls")
    args = parser.parse_args(argv)
    rounds = args.edits or (20 if args.quick else 100)
    asyncio.run(main_async(rounds, args.quick, args.poll))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
