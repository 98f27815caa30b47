"""Operators and windows in a running controller: signed approvals (and every way a false
one is refused), ``setpoint rollout pause|resume``, and maintenance windows.

A real controller with the rollouts extension, real git branches, a real mosquitto, and
simulated devices speaking the public protocol (``rolloutkit``). Operator commands are
published by hand (to forge them) and through the real ``setpoint`` verbs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from setpoint.cli import main
from setpoint.controller.broker import Backoff, BrokerSettings
from setpoint.controller.rolling import Rollouts
from setpoint.controller.service import Controller, ControllerConfig
from setpoint.proto import approvals, envelopes
from setpoint.proto.topics import Topics

from .rolloutkit import SimDevices, fleet_yaml, group, motd_change, operators_yaml, ringed_files

pytestmark = pytest.mark.broker

DEVICES = ["qa-1", "can-1", "can-2", "prod-1"]


def pem_private(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def alice() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def start(broker: Any, unique_prefix: str, signing_key: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    @contextlib.asynccontextmanager
    async def run(repo: Any) -> AsyncIterator[Rollouts]:
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
            yield controller.rollouts

    return run


@pytest.fixture
def sims(broker: Any, unique_prefix: str, public_key: Any):  # type: ignore[no-untyped-def]
    return lambda devices=DEVICES: SimDevices(
        broker.host, broker.port, unique_prefix, public_key, list(devices)
    )


@pytest.fixture
def send(broker: Any, unique_prefix: str):  # type: ignore[no-untyped-def]
    """Publish raw bytes on the operator command topic, as anyone on the broker could."""

    async def publish(raw: bytes) -> None:
        ident = f"op-{secrets.token_hex(4)}"
        async with aiomqtt.Client(broker.host, broker.port, identifier=ident) as client:
            await client.publish(Topics(unique_prefix).operator_commands(), raw, qos=1)

    return publish


def cli_flags(broker: Any, prefix: str) -> list[str]:
    return ["--broker", f"mqtt://{broker.host}:{broker.port}", "--prefix", prefix]


def ringed_repo(make_repo: Any, fleet: str) -> Any:
    repo = make_repo({**ringed_files(), "fleet.yaml": fleet})
    repo.git("branch", "canary")
    repo.git("branch", "production")
    return repo


def approve(tree: str) -> approvals.OperatorCommand:
    now = int(time.time())
    return approvals.OperatorCommand(
        "approve", secrets.token_hex(8), now, now + 300, ring="production", tree=tree
    )


# --- Approval -------------------------------------------------------------------------------


async def test_approval_gate_opens_only_on_a_valid_signed_approval(
    make_repo: Any, start: Any, sims: Any, send: Any, alice: Ed25519PrivateKey,
    signing_key: Path, broker: Any, unique_prefix: str, tmp_path: Path, capsys: Any,
) -> None:  # fmt: skip
    repo = ringed_repo(make_repo, fleet_yaml(True, alice=alice))
    tree = repo.git("rev-parse", "production^{tree}")
    mallory = Ed25519PrivateKey.generate()
    async with sims() as sim, start(repo) as rollouts:
        await sim.wait(lambda: sim.motd("can-2") == "v1")
        await sim.wait(lambda: "an approval of" in sim.rollout.get("prod", {}).get("reason", ""))
        assert sim.rollout["prod"]["state"] == "gated" and "prod" not in sim.groups

        def refusals() -> int:
            return len(sim.of("refused"))

        async def refused(raw: bytes, why: str) -> None:
            before = refusals()
            approved = dict(rollouts.ledger.approvals)
            published = dict(sim.groups.get("prod", {}))
            await send(raw)
            await sim.wait(lambda: refusals() > before)
            assert why in sim.of("refused")[-1]["reason"], sim.of("refused")[-1]
            assert rollouts.ledger.approvals == approved  # nothing changed
            assert sim.groups.get("prod", {}) == published

        # Unsigned: the bare command, no envelope.
        await refused(approvals.encode(approve(tree)), "operator command refused")
        # Signed by a key that is not an operator's (the fleet's own signing key included).
        await refused(approvals.sign(approve(tree), [mallory]), "operator command refused")
        fleet_key = envelopes.load_private_key(signing_key.read_bytes())
        await refused(approvals.sign(approve(tree), [fleet_key]), "operator command refused")
        # Forged: alice's signature over another command, its payload swapped.
        envelope = msgpack.unpackb(approvals.sign(approve("0" * 40), [alice]))
        envelope["payload"] = approvals.encode(approve(tree))
        await refused(msgpack.packb(envelope), "operator command refused")
        # Expired: validly signed, but its time is long gone.
        old = approve(tree)
        stale = approvals.OperatorCommand(
            "approve", old.nonce, old.issued_at - 3600, old.issued_at - 3000,
            ring="production", tree=tree,
        )  # fmt: skip
        await refused(approvals.sign(stale, [alice]), "expired")
        # The wrong operator key through the real verb: refused, exit 1, nothing approved.
        code = await asyncio.to_thread(
            main,
            ["approve", "production", "--key", str(pem_private(mallory, tmp_path / "m.key")),
             *cli_flags(broker, unique_prefix)],
        )  # fmt: skip
        assert code == 1 and "refused: operator command refused" in capsys.readouterr().out
        assert rollouts.ledger.approvals == {} and "prod" not in sim.groups
        assert sim.rollout["prod"]["state"] == "gated"

        # The real thing: alice approves what waits; production goes out by itself.
        valid = approvals.sign(approve(tree), [alice])
        await send(valid)
        await sim.wait(lambda: bool(sim.of("approved")))
        assert sim.of("approved")[0]["by"] == "alice"
        await sim.wait(lambda: sim.motd("prod-1") == "v1")
        # Replayed: the same bytes again are refused (the nonce was used).
        await refused(valid, "replayed")

        # The next content needs its own approval, given with the real verb.
        repo.commit(motd_change("v2"), "motd v2")
        await sim.wait(lambda: sim.motd("qa-1") == "v2")
        repo.git("branch", "-f", "canary", "main")
        await sim.wait(lambda: sim.motd("can-2") == "v2")
        repo.git("branch", "-f", "production", "canary")
        await sim.wait(
            lambda: (
                "an approval of" in sim.rollout["prod"]["reason"]
                and sim.gates.get("production", {}).get("tree") != tree
            )
        )
        assert sim.motd("prod-1") == "v1"
        code = await asyncio.to_thread(
            main,
            ["approve", "production", "--key", str(pem_private(alice, tmp_path / "a.key")),
             *cli_flags(broker, unique_prefix)],
        )  # fmt: skip
        assert code == 0 and "approved" in capsys.readouterr().out
        await sim.wait(lambda: sim.motd("prod-1") == "v2")
    audit = (tmp_path / "state" / "audit.jsonl").read_text()
    assert audit.count('"reason":"approved"') == 2


# --- Pause and resume -----------------------------------------------------------------------


async def test_a_paused_group_releases_no_batch_until_resumed(
    make_repo: Any, start: Any, sims: Any, alice: Ed25519PrivateKey,
    broker: Any, unique_prefix: str, tmp_path: Path, capsys: Any,
) -> None:  # fmt: skip
    repo = ringed_repo(make_repo, fleet_yaml(False, alice=alice))
    key = str(pem_private(alice, tmp_path / "alice.key"))

    async def rollout(action: str) -> int:
        argv = ["rollout", action, "canaries", "--key", key, *cli_flags(broker, unique_prefix)]
        return await asyncio.to_thread(main, argv)

    async with sims() as sim, start(repo):
        await sim.wait(lambda: sim.motd("prod-1") == "v1")
        # can-1 (batch 1) is offline: batch 1 cannot complete while we pause.
        sim.sims["can-1"].offline = True
        await sim.refresh()
        repo.commit(motd_change("v2"), "motd v2")
        await sim.wait(lambda: sim.motd("qa-1") == "v2")
        repo.git("branch", "-f", "canary", "main")
        await sim.wait(lambda: len(sim.of("batch-released")) == 1)
        assert await rollout("pause") == 0
        assert capsys.readouterr().out.startswith("paused: canaries")
        await sim.wait(lambda: sim.rollout["canaries"]["paused"])
        # can-1 comes back and completes batch 1; batch 2 is not released while paused.
        sim.sims["can-1"].offline = False
        await sim.refresh()
        await sim.wait(lambda: bool(sim.of("batch-completed")))
        await sim.wait(lambda: sim.rollout["canaries"]["state"] == "paused")
        assert sim.rollout["canaries"]["reason"] == "paused after batch 1/2"
        assert len(sim.of("batch-released")) == 1 and sim.motd("can-2") == "v1"
        assert await rollout("resume") == 0
        assert capsys.readouterr().out.startswith("resumed: canaries")
        await sim.wait(lambda: sim.motd("can-2") == "v2" and len(sim.of("batch-released")) == 2)
        released = [e["devices"] for e in sim.of("batch-released")]
        assert released == [["can-1"], ["can-2"]]
        # A pause or resume without an operator key is refused before anything is sent.
        assert await asyncio.to_thread(
            main, ["rollout", "pause", "canaries", *cli_flags(broker, unique_prefix)]
        ) == 2  # fmt: skip
        assert "needs a GROUP and --key" in capsys.readouterr().err


# --- Maintenance windows --------------------------------------------------------------------


def closed_window() -> str:
    """A one-hour window every day that starts two hours from now (UTC): closed now."""
    start = (dt.datetime.now(dt.UTC).hour + 2) % 24
    return (
        "window: {days: [mon, tue, wed, thu, fri, sat, sun],"
        f' hours: "{start:02d}:00-{(start + 1) % 24:02d}:00", tz: UTC}}\n'
    )


async def test_outside_the_window_a_new_version_waits_unless_urgent(
    make_repo: Any, start: Any, sims: Any, send: Any, alice: Ed25519PrivateKey
) -> None:
    window = closed_window()
    repo = make_repo(
        {
            "fleet.yaml": operators_yaml(alice=alice),
            "groups/kiosks.yaml": group("main", "v1", window),
            "devices/k-1.yaml": "group: kiosks\n",
        }
    )
    async with sims(["k-1"]) as sim, start(repo):
        await sim.wait(lambda: sim.motd("k-1") == "v1")  # a first publication does not wait
        repo.commit({"groups/kiosks.yaml": group("main", "v2", window)}, "motd v2")
        await sim.wait(lambda: sim.rollout.get("kiosks", {}).get("state") == "pending")
        reason = sim.rollout["kiosks"]["reason"]
        assert reason.startswith("outside the maintenance window") and "opens" in reason
        assert [e["action"] for e in sim.of("window-wait")] == ["window-wait"]
        assert max(sim.groups["kiosks"]) == 1 and sim.motd("k-1") == "v1"
        repo.commit({"groups/kiosks.yaml": group("main", "v3", window)}, "[urgent] motd v3")
        # "[urgent]" alone is anyone's word: it still waits for the window...
        await sim.wait(lambda: len(sim.of("window-wait")) == 2)
        assert sim.motd("k-1") == "v1"
        # ...until an operator approves that content for its branch (a signed approval).
        now = int(time.time())
        tree = repo.git("rev-parse", "main^{tree}")
        command = approvals.OperatorCommand(
            "approve", secrets.token_hex(8), now, now + 300, ring="main", tree=tree
        )
        await send(approvals.sign(command, [alice]))
        await sim.wait(lambda: sim.motd("k-1") == "v3")
        await sim.wait(lambda: sim.rollout["kiosks"]["state"] != "pending")
