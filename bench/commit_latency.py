"""Commit to retained bundle: how long from ``git commit`` until a subscriber holds the bundle.

    .venv/bin/python -m bench.commit_latency [--runs 20]

Starts a private mosquitto, an example fleet repository (``setpoint init``'s), a real
controller watching it, and a plain ``setpoint.transport`` subscriber on the device's
desired topic (the codec the controller and the simulator use). Each run commits a change
to one device file with the git CLI (as an operator would) and waits for the new version
to arrive. Two clocks per commit: from the start of ``git commit``, and from the moment
the branch ref was updated (the ref file's mtime). Prints a table and appends a JSON line
to ``bench/results/results.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from setpoint.commands import keys
from setpoint.controller import examples
from setpoint.controller.broker import BrokerSettings
from setpoint.controller.service import Controller, ControllerConfig
from setpoint.mosquitto import Broker
from setpoint.proto import bundles, envelopes
from setpoint.proto.topics import Topics
from setpoint.proto.trust import PAYLOAD_TYPES
from setpoint.transport import Session, Settings, Subscription

from .common import record

DEVICE = "kiosk-01"


def git(repo: Path, *args: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "Bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(repo),
    }
    subprocess.run(
        ["git", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(runs: int, work: Path) -> dict[str, object]:
    repo = work / "fleet"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for name, text in examples.FILES.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "example fleet")
    keys.generate(work / "keys")
    trusted = envelopes.trusted_keys(
        [envelopes.load_public_key((work / "keys" / keys.PUBLIC_NAME).read_bytes())]
    )
    topics = Topics("setpoint/v1")
    topic = topics.device_desired(DEVICE)
    ref_file = repo / ".git" / "refs" / "heads" / "main"
    from_start: list[float] = []
    from_ref: list[float] = []
    with Broker(work / "broker") as broker:
        config = ControllerConfig(
            repo=str(repo),
            broker=BrokerSettings(broker.host, broker.port),
            key_path=work / "keys" / keys.PRIVATE_NAME,
            state_dir=work / "state",
        )
        arrivals: asyncio.Queue[tuple[float, int]] = asyncio.Queue()

        def on_bundle(topic: str, payload: bytes, retain: bool) -> None:
            arrived = time.time()  # stamped in the network callback, before any queue
            if payload:
                verified = envelopes.verify(payload, trusted, payload_type=PAYLOAD_TYPES["device"])
                arrivals.put_nowait((arrived, bundles.decode(verified).version))

        async with Controller(config) as ctl:
            await ctl.settle(30)
            client = await Session.open(
                Settings(broker.host, broker.port, "bench-commit"), on_bundle
            )
            try:
                await client.subscribe([Subscription(topic, 1)])
                _, version = await asyncio.wait_for(arrivals.get(), 10)
                for run in range(1, runs + 1):
                    (repo / "devices" / f"{DEVICE}.yaml").write_text(
                        f"group: kiosks\nvars: {{n: {run}}}\n"
                    )
                    git(repo, "add", "-A")
                    started = time.time()
                    await asyncio.to_thread(git, repo, "commit", "-q", "-m", f"run {run}")
                    ref_updated = ref_file.stat().st_mtime_ns / 1e9
                    while True:
                        arrived, got = await asyncio.wait_for(arrivals.get(), 10)
                        if got > version:
                            version = got
                            break
                    from_start.append(arrived - started)
                    from_ref.append(arrived - ref_updated)
                    await ctl.settle(10)
            finally:
                client.close()
    return {
        "runs": runs,
        "from_commit_start_ms": {
            "median": statistics.median(from_start) * 1000,
            "p90": percentile(from_start, 0.9) * 1000,
            "max": max(from_start) * 1000,
        },
        "from_ref_update_ms": {
            "median": statistics.median(from_ref) * 1000,
            "p90": percentile(from_ref, 0.9) * 1000,
            "max": max(from_ref) * 1000,
        },
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5 runs")
    args = parser.parse_args(argv)
    runs = 5 if args.quick else args.runs
    with tempfile.TemporaryDirectory(prefix="setpoint-bench-") as tmp:
        result = record("commit_latency", args.quick, asyncio.run(measure(runs, Path(tmp))))
    print(f"commit -> retained bundle at a subscriber, {runs} commits")
    print(f"{'clock':<22}{'median ms':>10}{'p90 ms':>10}{'max ms':>10}")
    for label, key in (
        ("from git commit start", "from_commit_start_ms"),
        ("from ref update", "from_ref_update_ms"),
    ):
        row = result[key]
        assert isinstance(row, dict)
        print(f"{label:<22}{row['median']:>10.1f}{row['p90']:>10.1f}{row['max']:>10.1f}")
    return result


if __name__ == "__main__":
    main()
