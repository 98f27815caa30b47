"""Faults: the broker down, restarted, killed and wiped; remotes, webhooks and polling."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from setpoint.commands import notify

from .conftest import read_retained

pytestmark = pytest.mark.broker

ALL = {"group/kiosks", "group/gateways", "device/kiosk-01", "device/kiosk-02", "device/gw-01"}


def audit(state_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state_dir / "audit.jsonl").open()]


async def test_broker_down_at_start_then_up(
    example_repo: Any,
    run_controller: Any,
    broker: Any,
    unique_prefix: str,
    public_key: Any,
) -> None:
    broker.stop()
    async with run_controller(example_repo) as controller:
        await asyncio.wait_for(controller.link.failed.wait(), 10)
        assert not controller.link.connected
        broker.start()
        await controller.settle(15)
        found = await read_retained(broker.host, broker.port, unique_prefix, public_key)
    assert {t: b.version for t, b in found.items()} == dict.fromkeys(ALL, 1)


@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_broker_restarted_mid_publication(
    make_repo: Any,
    run_controller: Any,
    observe: Any,
    broker: Any,
    unique_prefix: str,
    public_key: Any,
    how: str,
    tmp_path: Path,
) -> None:
    files = {"groups/many.yaml": "mode: enforce\n"}
    files |= {f"devices/d{i:03}.yaml": f"group: many\nvars: {{n: {i}}}\n" for i in range(300)}
    repo = make_repo(files)
    async with observe() as seen, run_controller(repo) as controller:
        await seen.wait(lambda: len(seen.retained) >= 1)
        if how == "restart":
            broker.restart()
        else:
            broker.kill()
            broker.start()
        await controller.settle(30)
        assert controller.link.failures >= 1
        found = await read_retained(broker.host, broker.port, unique_prefix, public_key)
    assert len(found) == 301
    assert {b.version for b in found.values()} == {1}  # restored, never bumped
    published = {e["target"] for e in audit(tmp_path / "state") if e["reason"] == "change"}
    assert len(published) == 301


async def test_broker_killed_and_wiped_bundles_come_back_without_a_commit(
    example_repo: Any,
    run_controller: Any,
    broker: Any,
    unique_prefix: str,
    public_key: Any,
    tmp_path: Path,
) -> None:
    async with run_controller(example_repo) as controller:
        await controller.settle(10)
        before = await read_retained(broker.host, broker.port, unique_prefix, public_key)
        broker.kill()
        broker.wipe()
        broker.start()
        await asyncio.wait_for(controller.link.failed.wait(), 10)
        await controller.settle(15)
        after = await read_retained(broker.host, broker.port, unique_prefix, public_key)
    assert set(after) == ALL
    for target in ALL:
        assert after[target].version == before[target].version == 1
        assert after[target].content_digest() == before[target].content_digest()
    reasons = [e["reason"] for e in audit(tmp_path / "state")]
    assert reasons.count("restore") == len(ALL)


async def test_remote_repository_with_webhook_and_notify(
    example_repo: Any,
    run_controller: Any,
    observe: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = b"hook-secret"
    url = f"file://{example_repo.path}"
    async with (
        observe() as seen,
        run_controller(
            url,
            poll_interval=3600,
            webhook_listen=("127.0.0.1", 0),
            webhook_secret=secret,
        ) as controller,
    ):
        await seen.wait(lambda: set(seen.retained) == ALL)
        await controller.settle(10)
        assert controller.webhook_port
        example_repo.commit({"devices/kiosk-01.yaml": "group: kiosks\nvars: {site: hall}\n"})
        args = argparse.Namespace(
            controller=f"http://127.0.0.1:{controller.webhook_port}/",
            secret_file=None,
            ref=[],
            hook=False,
            timeout=5.0,
            json=False,
        )
        monkeypatch.setenv("SETPOINT_WEBHOOK_SECRET", "wrong")
        assert await asyncio.to_thread(notify.run, args) == 1
        monkeypatch.setenv("SETPOINT_WEBHOOK_SECRET", secret.decode())
        assert await asyncio.to_thread(notify.run, args) == 0
        await seen.wait(lambda: seen.version("device/kiosk-01") == 2)


async def test_remote_repository_polling_fallback(
    example_repo: Any,
    run_controller: Any,
    observe: Any,
) -> None:
    url = f"file://{example_repo.path}"
    async with observe() as seen, run_controller(url, poll_interval=0.2) as controller:
        await controller.settle(10)
        example_repo.commit({"devices/kiosk-01.yaml": "group: kiosks\nvars: {site: hall}\n"})
        await seen.wait(lambda: seen.version("device/kiosk-01") == 2)


async def test_restart_with_more_retained_bundles_than_the_broker_queues(
    make_repo: Any,
    run_controller: Any,
    broker: Any,
    unique_prefix: str,
    public_key: Any,
    tmp_path: Path,
) -> None:
    # mosquitto queues at most 1000 QoS 1 messages per client by default: the controller's
    # view of its retained topics must not depend on that.
    files = {"groups/many.yaml": "mode: enforce\n"}
    files |= {f"devices/d{i:04}.yaml": "group: many\n" for i in range(1200)}
    repo = make_repo(files)
    async with run_controller(repo) as controller:
        await controller.settle(30)
    lines = len(audit(tmp_path / "state"))
    async with run_controller(repo) as controller:
        await controller.settle(30)
        assert controller.retained is not None and len(controller.retained.entries) == 1201
    assert len(audit(tmp_path / "state")) == lines  # nothing republished
    found = await read_retained(broker.host, broker.port, unique_prefix, public_key)
    assert len(found) == 1201
