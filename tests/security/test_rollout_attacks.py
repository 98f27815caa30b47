"""Attacks by a writer of the default branch on the gates between rings: a real controller
with its rollouts extension, real git branches, a real mosquitto, and simulated devices
that speak the public protocol (``tests/controller/rolloutkit.py``).

Who may write what is in docs/security.md: a writer of ``main`` changes what qualification
runs, never what production runs, until the change passed every gate up to production.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).parents[1] / "controller"))

from gitkit import GitRepo
from rolloutkit import SimDevices, fleet_yaml, group, ringed_files

from setpoint.commands import keys
from setpoint.controller.broker import Backoff, BrokerSettings
from setpoint.controller.service import Controller, ControllerConfig
from setpoint.mosquitto import Broker
from setpoint.proto import approvals, envelopes
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker

DEVICES = ["qa-1", "can-1", "can-2", "prod-1"]
MALLORY = "Mallory Developer <mallory@example.com>"


class Fleet:
    """A private mosquitto, a ringed repository, the controller and the simulated devices."""

    def __init__(self, tmp: Path, prefix: str) -> None:
        self.tmp, self.prefix = tmp, prefix
        keys.generate(tmp / "keys")
        self.key = tmp / "keys" / keys.PRIVATE_NAME
        pem = (tmp / "keys" / keys.PUBLIC_NAME).read_bytes()
        self.trusted = envelopes.trusted_keys([envelopes.load_public_key(pem)])
        self.alice = Ed25519PrivateKey.generate()

    def repo(self, fleet: str) -> GitRepo:
        repo = GitRepo(self.tmp / "fleet")
        repo.commit({**ringed_files(), "fleet.yaml": fleet}, "first")
        repo.git("branch", "canary")
        repo.git("branch", "production")
        return repo

    @contextlib.asynccontextmanager
    async def running(self, broker: Broker, repo: GitRepo) -> AsyncIterator[SimDevices]:
        config = ControllerConfig(
            repo=str(repo.path),
            broker=BrokerSettings(broker.host, broker.port),
            key_path=self.key,
            state_dir=self.tmp / "state",
            prefix=self.prefix,
            backoff=Backoff(base=0.05, cap=0.3),
            publish_timeout=5.0,
        )
        sim = SimDevices(broker.host, broker.port, self.prefix, self.trusted, DEVICES)
        async with sim, Controller(config):  # rollouts are part of every controller
            yield sim


@pytest.fixture
def fleet(tmp_path: Path, unique_prefix: str) -> Fleet:
    return Fleet(tmp_path, unique_prefix)


def _gated_from(sim: SimDevices, source: str) -> list[dict[str, Any]]:
    return [e for e in sim.of("gated") if e["ring"] == "production" and e.get("source") == source]


async def _production_waits_for_an_approval(sim: SimDevices) -> None:
    await sim.wait(lambda: sim.motd("can-2") == "v1")
    await sim.wait(lambda: "an approval of" in sim.rollout.get("prod", {}).get("reason", ""))


async def test_default_branch_writer_points_a_production_group_at_main(
    fleet: Fleet, broker: Broker
) -> None:
    repo = fleet.repo(fleet_yaml(False, alice=fleet.alice))
    async with fleet.running(broker, repo) as sim:
        await sim.wait(lambda: sim.motd("prod-1") == "v1")
        prod_version = max(sim.groups["prod"])
        # Mallory may write main: she points the production group at main, with new content.
        repo.commit({"groups/prod.yaml": group("main", "pwned")}, "prod follows main",
                    author=MALLORY)  # fmt: skip
        await sim.wait(lambda: bool(_gated_from(sim, "main")) or sim.motd("prod-1") != "v1")
        assert sim.motd("prod-1") == "v1", "main's content reached production ungated"
        gated = _gated_from(sim, "main")[-1]
        assert gated["groups"] == ["prod"] and gated["state"] == "refused"
        assert (
            "group/prod ran on production and would now take content from main" in (gated["reason"])
        )
        await sim.wait(lambda: sim.rollout.get("prod", {}).get("state") == "refused")
        # Nothing new reached production.
        assert max(sim.groups["prod"]) == prod_version and sim.motd("prod-1") == "v1"
        # Moving the device into a group on main is a change to it too: held the same way.
        repo.commit({"devices/prod-1.yaml": "group: qa\n"}, "prod-1 joins qa", author=MALLORY)
        await sim.wait(
            lambda: any("device/prod-1" in e["reason"] for e in _gated_from(sim, "main"))
        )
        assert sim.device_bundles["prod-1"].group == "prod" and sim.motd("prod-1") == "v1"


async def _send(broker: Broker, prefix: str, raw: bytes) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier=secrets.token_hex(6)) as c:
        await c.publish(Topics(prefix).operator_commands(), raw, qos=1)


async def test_default_branch_writer_drops_the_approval_and_adds_a_key(
    fleet: Fleet, broker: Broker
) -> None:
    repo = fleet.repo(fleet_yaml(True, alice=fleet.alice))
    mallory = Ed25519PrivateKey.generate()
    async with fleet.running(broker, repo) as sim:
        await _production_waits_for_an_approval(sim)
        # Mallory rewrites fleet.yaml on main: no approval, and her own operator key. The
        # same commit changes qualification, so we know when the controller has read it.
        weakened = fleet_yaml(False, alice=fleet.alice, mallory=mallory)
        files = {"fleet.yaml": weakened, "groups/qa.yaml": group("main", "v1b")}
        repo.commit(files, "relax the production gate", author=MALLORY)
        await sim.wait(lambda: sim.motd("qa-1") == "v1b")
        tree = repo.git("rev-parse", "production^{tree}")
        now = int(time.time())
        command = approvals.OperatorCommand(
            "approve", secrets.token_hex(8), now, now + 300, ring="production", tree=tree
        )
        before = len(sim.of("refused"))
        await _send(broker, fleet.prefix, approvals.sign(command, [mallory]))
        await sim.wait(lambda: len(sim.of("refused")) > before)
        assert "operator command refused" in sim.of("refused")[-1]["reason"]
        # Production still waits for an approval by a key from the protected branch.
        assert "an approval of" in sim.rollout["prod"]["reason"]
        assert sim.rollout["prod"]["state"] == "gated" and "prod" not in sim.groups
        assert (fleet.tmp / "state" / "config-branch").read_text().strip() == "production"


async def test_approved_in_a_developers_commit_subject_opens_no_gate(
    fleet: Fleet, broker: Broker
) -> None:
    repo = fleet.repo(fleet_yaml(True, alice=fleet.alice))
    async with fleet.running(broker, repo) as sim:
        await _production_waits_for_an_approval(sim)
        # Mallory's commit on main claims an approval; canary's and production's owners
        # fast-forward it (a promotion), subject and all.
        files = {f"groups/{g}.yaml": group(b, "v2") for g, b in
                 (("qa", "main"), ("canaries", "canary"), ("prod", "production"))}  # fmt: skip
        files["groups/canaries.yaml"] = group(
            "canary", "v2", "rollout: {batch: 1, on_failure: revert}\n"
        )
        repo.commit(files, "[approved] motd v2", author=MALLORY)
        repo.git("branch", "-f", "canary", "main")
        await sim.wait(lambda: sim.motd("can-2") == "v2")
        repo.git("branch", "-f", "production", "main")
        tree = repo.git("rev-parse", "production^{tree}")
        await sim.wait(lambda: sim.gates.get("production", {}).get("tree") == tree)
        assert "an approval of" in sim.gates["production"]["reason"]
        assert "prod" not in sim.groups and sim.motd("prod-1") is None


async def test_urgent_in_a_developers_commit_subject_skips_no_window(
    fleet: Fleet, broker: Broker
) -> None:
    start = (time.gmtime().tm_hour + 2) % 24  # a one-hour window, closed now
    window = (
        "window: {days: [mon, tue, wed, thu, fri, sat, sun],"
        f' hours: "{start:02d}:00-{(start + 1) % 24:02d}:00", tz: UTC}}\n'
    )
    repo = fleet.repo(fleet_yaml(False, alice=fleet.alice))
    repo.commit({"groups/qa.yaml": group("main", "v1", window)}, "qa has a window")
    async with fleet.running(broker, repo) as sim:
        await sim.wait(lambda: sim.motd("qa-1") == "v1")
        repo.commit({"groups/qa.yaml": group("main", "now", window)}, "[urgent] now",
                    author=MALLORY)  # fmt: skip
        await sim.wait(
            lambda: sim.rollout.get("qa", {}).get("state") == "pending" or sim.motd("qa-1") != "v1"
        )
        assert sim.motd("qa-1") == "v1", "an [urgent] subject skipped the window"
        assert "outside the maintenance window" in sim.rollout["qa"]["reason"]
