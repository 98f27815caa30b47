"""Rings, gates, batches, halt and revert: a real controller, real git branches, a real
mosquitto, and simulated devices that speak the public protocol (``rolloutkit``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from setpoint.controller.broker import Backoff, BrokerSettings
from setpoint.controller.rolling import Rollouts
from setpoint.controller.service import Controller, ControllerConfig

from .rolloutkit import SimDevices, motd_change, ringed_files

pytestmark = pytest.mark.broker

DEVICES = ["qa-1", "can-1", "can-2", "prod-1"]


@pytest.fixture
def start(broker: Any, unique_prefix: str, signing_key: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    @contextlib.asynccontextmanager
    async def run(repo: Any) -> AsyncIterator[tuple[Controller, Rollouts]]:
        config = ControllerConfig(
            repo=str(repo.path),
            broker=BrokerSettings(broker.host, broker.port),
            key_path=signing_key,
            state_dir=tmp_path / "state",
            prefix=unique_prefix,
            backoff=Backoff(base=0.05, cap=0.3),
            publish_timeout=5.0,
        )
        async with Controller(config) as controller:
            yield controller, controller.rollouts

    return run


@pytest.fixture
def sims(broker: Any, unique_prefix: str, public_key: Any):  # type: ignore[no-untyped-def]
    return lambda: SimDevices(broker.host, broker.port, unique_prefix, public_key, DEVICES)


def ringed_repo(make_repo: Any) -> Any:
    repo = make_repo(ringed_files())
    repo.git("branch", "canary")
    repo.git("branch", "production")
    return repo


def merge(repo: Any, source: str, into: str, message: str | None = None) -> str:
    repo.git("checkout", "-q", into)
    try:
        repo.git("merge", "-q", "--no-ff", "-m", message or f"promote {source} to {into}", source)
        return repo.git("rev-parse", "HEAD")
    finally:
        repo.git("checkout", "-q", "main")


def everywhere(sim: SimDevices, motd: str) -> bool:
    return all(sim.motd(d) == motd for d in DEVICES)


async def test_rings_promote_gate_batches_and_revert(
    make_repo: Any, start: Any, sims: Any, tmp_path: Path
) -> None:
    repo = ringed_repo(make_repo)
    async with sims() as sim, start(repo):
        # Bootstrap: every ring gets v1, each after the ring before it proved it.
        await sim.wait(lambda: everywhere(sim, "v1"))
        gated_first = [e for e in sim.of("gated") if e["ring"] == "production"]
        assert gated_first, "production waited for canary before its first publication"

        # A change on main converges on qualification only.
        repo.commit(motd_change("v2"), "motd v2")
        await sim.wait(lambda: sim.motd("qa-1") == "v2")
        assert sim.motd("can-1") == "v1" and sim.motd("prod-1") == "v1"

        # Promoted to canary: rolls in batches of one; production merged early waits.
        merge(repo, "main", "canary")
        merge(repo, "canary", "production")
        await sim.wait(lambda: sim.motd("can-1") == "v2" and sim.motd("can-2") == "v2")
        await sim.wait(lambda: len(sim.of("batch-released")) >= 2)
        released = [e for e in sim.of("batch-released") if e["group"] == "canaries"]
        assert [e["devices"] for e in released] == [["can-1"], ["can-2"]]
        await sim.wait(lambda: sim.motd("prod-1") == "v2")
        prod_gated = [e for e in sim.of("gated") if e["ring"] == "production"]
        assert len(prod_gated) >= 2  # it was gated on v2 too before going out by itself

        # A change that fails on canary: halted after batch 1, reverted once by the controller.
        sim.sims["can-1"].fails_on.add("v3")
        repo.commit(motd_change("v3"), "motd v3")
        await sim.wait(lambda: sim.motd("qa-1") == "v3")
        bad = merge(repo, "main", "canary", "promote v3")
        merge(repo, "canary", "production", "promote v3 to production (early)")
        await sim.wait(lambda: bool(sim.of("rollout-halted")))
        halted = sim.of("rollout-halted")[0]
        assert halted["group"] == "canaries" and halted["commit"] == bad
        assert [d["device"] for d in halted["devices"]] == ["can-1"]
        await sim.wait(lambda: bool(sim.of("reverted")))
        revert = sim.of("reverted")[0]["revert"]
        assert repo.head("canary") == revert
        message = repo.git("log", "-1", "--format=%an%n%B", "canary")
        assert message.startswith("setpoint controller") and "Setpoint-Halt: canaries-v" in message
        # The fleet walks back: can-1 never left v2 content; can-2 was never released.
        await sim.wait(lambda: sim.rollout.get("canaries", {}).get("state") in ("idle", "done"))
        assert sim.motd("can-1") == "v2" and sim.motd("can-2") == "v2"
        assert sim.motd("prod-1") == "v2"
        assert sim.rollout["prod"]["state"] in ("gated", "refused")
    assert len(sim.of("rollout-halted")) == 1 and len(sim.of("reverted")) == 1
    log = repo.git("log", "--format=%an", "canary")
    assert log.count("setpoint controller") == 1
    audit = (tmp_path / "state" / "audit.jsonl").read_text()
    for reason in ("gate-opened", "batch-released", "rollout-halted", "reverted"):
        assert f'"reason":"{reason}"' in audit


async def test_content_that_never_ran_on_canary_is_refused_and_force_push_is_followed(
    make_repo: Any, start: Any, sims: Any
) -> None:
    repo = ringed_repo(make_repo)
    async with sims() as sim, start(repo):
        await sim.wait(lambda: everywhere(sim, "v1"))
        prod_version = max(sim.groups["prod"])
        good = repo.head("production")
        repo.commit(motd_change("hotfix"), "hotfix straight to production", branch="production")
        await sim.wait(lambda: sim.rollout.get("prod", {}).get("state") == "refused")
        assert "never ran on canary" in sim.rollout["prod"]["reason"]
        refused = [e for e in sim.of("gated") if e["state"] == "refused"]
        assert refused and refused[-1]["ring"] == "production"
        assert sim.gates["production"]["state"] == "refused"
        # Force-push back to what runs: nothing is waiting any more, nothing republished.
        repo.git("branch", "-f", "production", good)
        await sim.wait(lambda: sim.rollout.get("prod", {}).get("state") == "idle")
        # Force-push to content that ran on main but never on canary: refused again.
        repo.git("branch", "-f", "production", repo.head("main"))
        repo.commit(motd_change("v2"), "v2 on main")
        repo.git("branch", "-f", "production", repo.head("main"))
        await sim.wait(lambda: sim.rollout.get("prod", {}).get("state") == "refused")
        assert max(sim.groups["prod"]) == prod_version and sim.motd("prod-1") == "v1"


async def test_restart_mid_rollout_releases_no_batch_twice_and_waits_for_offline(
    make_repo: Any, start: Any, sims: Any, tmp_path: Path
) -> None:
    repo = ringed_repo(make_repo)
    async with sims() as sim:
        async with start(repo):
            await sim.wait(lambda: everywhere(sim, "v1"))
            sim.sims["can-2"].offline = True
            await sim.refresh()
            repo.commit(motd_change("v2"), "motd v2")
            merge(repo, "main", "canary")
            await sim.wait(lambda: sim.motd("can-1") == "v2")
            await sim.wait(lambda: len(sim.of("batch-released")) == 2)
            # Batch 2 (can-2) is released but can-2 is offline: counted as not in sync,
            # so a batch that needs 100% waits and says why.
            await sim.wait(lambda: "offline: can-2" in sim.rollout["canaries"]["reason"])
        audit = tmp_path / "state" / "audit.jsonl"
        assert audit.read_text().count('"reason":"batch-released"') == 2
        async with start(repo) as (controller, _rollouts):
            await controller.settle(10)
            sim.sims["can-2"].offline = False
            await sim.refresh()
            await sim.wait(lambda: sim.motd("can-2") == "v2")
            await sim.wait(lambda: sim.rollout["canaries"]["state"] == "done")
            await controller.settle(10)
        assert audit.read_text().count('"reason":"batch-released"') == 2
        assert audit.read_text().count('"reason":"rollout-completed"') == 1


async def test_cli_promote_checks_the_gate_and_status_reports(
    make_repo: Any, start: Any, sims: Any, broker: Any, unique_prefix: str, capsys: Any
) -> None:
    import asyncio
    import json

    from setpoint.cli import main

    repo = ringed_repo(make_repo)
    flags = ["--broker", f"mqtt://{broker.host}:{broker.port}", "--prefix", unique_prefix]
    async with sims() as sim, start(repo):
        await sim.wait(lambda: everywhere(sim, "v1"))
        await sim.wait(lambda: bool(sim.gates.get("production", {}).get("passed")))
        repo.commit(motd_change("untested"), "straight to canary", branch="canary")
        before = repo.head("production")
        code = await asyncio.to_thread(
            main, ["promote", "canary", "production", "--repo", str(repo.path), "--json", *flags]
        )
        refused = json.loads(capsys.readouterr().out)
        assert code == 1 and not refused["promoted"]
        assert "has not passed on canary" in refused["reason"]
        assert repo.head("production") == before
        repo.git("branch", "-f", "canary", repo.head("canary") + "~1")
        code = await asyncio.to_thread(
            main, ["promote", "canary", "production", "--repo", str(repo.path), "--json", *flags]
        )
        merged = json.loads(capsys.readouterr().out)
        assert code == 0 and merged["promoted"] and repo.head("production") == merged["commit"]
        code = await asyncio.to_thread(main, ["rollout", "status", "--json", *flags])
        shown = json.loads(capsys.readouterr().out)
        assert code == 0 and set(shown["groups"]) == {"qa", "canaries", "prod"}
        assert shown["rings"]["production"]["from"] == "canary"
