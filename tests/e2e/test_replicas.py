"""Controller replicas: two real ``setpoint controller --lease`` processes on one fleet.

One leads and publishes; the other publishes nothing. The leader is killed with SIGKILL, a
commit lands meanwhile, and the other replica takes the lead with the next term and
publishes the commit with the next version: nothing lost, nothing published twice.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_controller_cli import ALL, ENV, Subscriber, git, setpoint

from setpoint.proto import envelopes, leader
from setpoint.proto.leader import LeaderRecord
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker


class LeaderWatch:
    """Every verified leader record, in the order the broker delivered them."""

    def __init__(self, host: str, port: int, prefix: str, public_key_pem: bytes) -> None:
        self.trusted = envelopes.trusted_keys([envelopes.load_public_key(public_key_pem)])
        self.records: list[LeaderRecord] = []
        self._cond = threading.Condition()
        topic = Topics(prefix).controller_leader()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-leader-{secrets.token_hex(4)}"
        )
        self._client.on_connect = lambda client, *_: client.subscribe(topic, 1)
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        verified = envelopes.verify_signed(
            bytes(message.payload), self.trusted, payload_type=envelopes.LEADER_TYPE
        )
        with self._cond:
            self.records.append(leader.decode(verified.payload))
            self._cond.notify_all()

    def wait(self, predicate: Callable[[list[LeaderRecord]], bool], timeout: float = 30) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.records), timeout), self.records

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def replica(fleet: dict[str, Path], broker: Any, prefix: str, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "setpoint", "controller", "--repo", str(fleet["repo"]),
            "--broker", broker.url, "--key", str(fleet["key"]), "--prefix", prefix,
            "--state-dir", str(fleet["state"] / name), "--lease", "2", "--replica-id", name,
        ],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, Path]:
    setpoint("init", str(tmp_path / "fleet"), check=True)
    setpoint("keys", "generate", "--out", str(tmp_path / "keys"), check=True)
    return {
        "repo": tmp_path / "fleet",
        "key": tmp_path / "keys" / "signing.key",
        "pub": tmp_path / "keys" / "signing.pub",
        "state": tmp_path / "state",
    }


def published(seen: Subscriber) -> list[tuple[str, int]]:
    return [(e["target"], e["version"]) for e in seen.events if e["type"] == "published"]


def test_the_leader_is_killed_and_the_other_replica_takes_over(
    fleet: dict[str, Path], broker: Any, unique_prefix: str
) -> None:
    pub = fleet["pub"].read_bytes()
    seen = Subscriber(broker.host, broker.port, unique_prefix, pub)
    leads = LeaderWatch(broker.host, broker.port, unique_prefix, pub)
    processes = {name: replica(fleet, broker, unique_prefix, name) for name in ("ctl-a", "ctl-b")}
    try:
        seen.wait(lambda: set(seen.payloads) == ALL, timeout=30)
        leads.wait(lambda records: len(records) >= 2)  # a claim and a renewal
        first = leads.records[-1]
        assert first.holder in processes and first.term >= 1
        seen.wait(lambda: len(published(seen)) >= len(ALL))
        # Only the leader published: each target once, at version 1.
        assert sorted(published(seen)) == sorted((t.split("/")[1], 1) for t in ALL)

        processes[first.holder].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        (fleet["repo"] / "devices" / "kiosk-01.yaml").write_text(
            "group: kiosks\nvars:\n  site: entrance\n"
        )
        git(fleet["repo"], "commit", "-qam", "kiosk-01 at the entrance")
        other = next(name for name in processes if name != first.holder)
        leads.wait(lambda records: records[-1].holder == other)
        assert leads.records[-1].term == first.term + 1
        seen.wait(
            lambda: (b := seen.bundle("device/kiosk-01")) is not None and b.version == 2,
            timeout=30,
        )
        print(f"handover and publication: {time.monotonic() - killed_at:.2f}s after SIGKILL")
        seen.wait(lambda: ("kiosk-01", 2) in published(seen))
        # Nothing published twice, and every other target kept its version 1.
        assert published(seen).count(("kiosk-01", 2)) == 1
        for target in ALL - {"device/kiosk-01"}:
            bundle = seen.bundle(target)
            assert bundle is not None and bundle.version == 1, target
    finally:
        leads.close()
        seen.close()
        logs = {}
        for name, process in processes.items():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            logs[name] = process.communicate(timeout=15)[1]
    survivor = processes[other]
    assert survivor.returncode == 0, logs[other]
    assert f"replica {other} leads (term {first.term + 1})" in logs[other], logs[other]
    print(logs[other])


def test_lease_and_once_do_not_mix(fleet: dict[str, Path]) -> None:
    done = setpoint(
        "controller", "--repo", str(fleet["repo"]), "--broker", "mqtt://127.0.0.1:1",
        "--key", str(fleet["key"]), "--lease", "5", "--once",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--lease runs a replica until stopped; it cannot be used with --once" in done.stderr
