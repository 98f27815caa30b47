"""Controller replicas under test: start ``setpoint controller --lease`` processes, watch the
leader record, and the scenario both the mosquitto and the NATS tests run: the leader is
killed with SIGKILL, a commit lands meanwhile, and the other replica takes over."""

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
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from setpoint.proto import envelopes, leader
from setpoint.proto.leader import LeaderRecord
from setpoint.proto.topics import Topics

sys.path.insert(0, str(Path(__file__).parent))

from test_controller_cli import ALL, ENV, Subscriber, git, setpoint


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    return parts.hostname, parts.port


class LeaderWatch:
    """Every verified leader record, in the order the broker delivered them (MQTT 3.1.1)."""

    def __init__(self, url: str, prefix: str, public_key_pem: bytes) -> None:
        self.trusted = envelopes.trusted_keys([envelopes.load_public_key(public_key_pem)])
        self.records: list[LeaderRecord] = []
        self._cond = threading.Condition()
        topic = Topics(prefix).controller_leader()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-leader-{secrets.token_hex(4)}"
        )
        self._client.on_connect = lambda client, *_: client.subscribe(topic, 1)
        self._client.on_message = self._on_message
        self._client.connect(*host_port(url))
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


def replica(
    fleet: dict[str, Path], url: str, prefix: str, name: str, lease: str = "2"
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "setpoint", "controller", "--repo", str(fleet["repo"]),
            "--broker", url, "--key", str(fleet["key"]), "--prefix", prefix,
            "--state-dir", str(fleet["state"] / name), "--lease", lease, "--replica-id", name,
        ],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def nats_fleet(tmp_path: Path) -> dict[str, Path]:
    """The example fleet, declared for the NATS engine, and its signing keys."""
    repo = tmp_path / "fleet"
    setpoint("init", str(repo), check=True)
    setpoint("keys", "generate", "--out", str(tmp_path / "keys"), check=True)
    (repo / "fleet.yaml").write_text((repo / "fleet.yaml").read_text() + "engine: nats\n")
    git(repo, "commit", "-qam", "on nats")
    return {
        "repo": repo,
        "key": tmp_path / "keys" / "signing.key",
        "pub": tmp_path / "keys" / "signing.pub",
        "state": tmp_path / "state",
    }


def published(seen: Subscriber) -> list[tuple[str, int]]:
    return [(e["target"], e["version"]) for e in seen.events if e["type"] == "published"]


def kill_the_leader_and_commit(
    fleet: dict[str, Path],
    urls: dict[str, str],
    watch_url: str,
    prefix: str,
    kill: Callable[[str], None] | None = None,
) -> float:
    """Two replicas (``urls``: name -> broker URL); one leads and alone publishes; it is
    killed (SIGKILL, or ``kill(name)``: its broker node, say) and a commit made; the other
    leads with the next term and publishes the commit once, with the next version. Returns
    the seconds from the kill to the publication."""
    pub = fleet["pub"].read_bytes()
    seen = Subscriber(*host_port(watch_url), prefix, pub)
    leads = LeaderWatch(watch_url, prefix, pub)
    processes = {name: replica(fleet, url, prefix, name) for name, url in urls.items()}
    other = ""
    try:
        seen.wait(lambda: set(seen.payloads) == ALL, timeout=60)
        leads.wait(lambda records: len(records) >= 2)  # a claim and a renewal
        first = leads.records[-1]
        assert first.holder in processes and first.term >= 1
        seen.wait(lambda: len(published(seen)) >= len(ALL))
        # Only the leader published: each target once, at version 1.
        assert sorted(published(seen)) == sorted((t.split("/")[1], 1) for t in ALL)

        if kill is None:
            processes[first.holder].send_signal(signal.SIGKILL)
        else:
            kill(first.holder)
        killed_at = time.monotonic()
        (fleet["repo"] / "devices" / "kiosk-01.yaml").write_text(
            "group: kiosks\nvars:\n  site: entrance\n"
        )
        git(fleet["repo"], "commit", "-qam", "kiosk-01 at the entrance")
        other = next(name for name in processes if name != first.holder)
        # A renewal by the other replica: it leads. Its term is the next one, or a later one
        # when a claim did not come back in time (an engine electing new stream leaders
        # after a node's death stalls for seconds).
        leads.wait(lambda records: records[-1].holder == other and records[-1].renewal >= 1)
        new_term = leads.records[-1].term
        assert new_term > first.term, leads.records
        seen.wait(
            lambda: (b := seen.bundle("device/kiosk-01")) is not None and b.version == 2,
            timeout=30,
        )
        took = time.monotonic() - killed_at
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
    assert processes[other].returncode == 0, logs[other]
    assert f"replica {other} leads (term {new_term})" in logs[other], logs[other]
    return took
