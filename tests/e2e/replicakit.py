"""Controller replicas under test: start ``setpoint controller --lease`` processes, watch the
leader record, and the scenario both the mosquitto and the NATS tests run: the leader is
killed with SIGKILL, a commit lands meanwhile, and the other replica takes over."""

from __future__ import annotations

import itertools
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

from setpoint.controller.sharding import rank
from setpoint.proto import bundles, envelopes, leader, reports, status
from setpoint.proto.leader import LeaderRecord
from setpoint.proto.reports import Applied, Report, ResourceReport
from setpoint.proto.status import DriftStatus, GroupStatus
from setpoint.proto.topics import SHARDS, Topics, shard_of

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


LEASE_S = "2"


def replica(
    fleet: dict[str, Path],
    url: str,
    prefix: str,
    name: str,
    lease: str = LEASE_S,
    *extra: str,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "setpoint", "controller", "--repo", str(fleet["repo"]),
            "--broker", url, "--key", str(fleet["key"]), "--prefix", prefix,
            "--state-dir", str(fleet["state"] / name), "--lease", lease, "--replica-id", name,
            *extra,
        ],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


STOP_S = 15  # a replica stops within lease/2 plus its tasks' unwinding: far less


def eventually(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    """Until ``predicate()`` is true (polled), or AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(0.2)


class StderrLines:
    """A process's stderr read as it comes (a thread), to wait for a line while it runs."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        self._stream = process.stderr
        self._lines: list[str] = []
        self._added = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._stream:
            with self._added:
                self._lines.append(line)
                self._added.notify_all()

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        with self._added:
            if not self._added.wait_for(lambda: any(text in x for x in self._lines), timeout):
                raise AssertionError(f"no {text!r} on stderr in {timeout:g}s:\n{self.tail()}")

    def text(self) -> str:
        self._reader.join(timeout=STOP_S)
        with self._added:
            return "".join(self._lines)

    def tail(self, lines: int = 40) -> str:
        return "".join(self._lines[-lines:])


def stop(process: subprocess.Popen[str], stderr: StderrLines | None = None) -> str:
    """SIGTERM (if it still runs) and its stderr once it exited. A replica that does not
    stop within STOP_S is killed, and the failure shows the end of its stderr."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        if stderr is None:
            return process.communicate(timeout=STOP_S)[1]
        process.wait(timeout=STOP_S)
        return stderr.text()
    except subprocess.TimeoutExpired:
        process.kill()
        text = process.communicate()[1] if stderr is None else stderr.text()
        tail = "".join(text.splitlines(keepends=True)[-40:])
        raise AssertionError(
            f"{' '.join(map(str, process.args[-4:]))}: still running {STOP_S}s after SIGTERM"
            f" (killed); the end of its stderr:\n{tail}"
        ) from None


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
        # On a cluster whose node was just lost the engine holds QoS 1 traffic for ~25 s
        # while it elects (scale-out.md): claims can go unanswered for that long, so the
        # wait is bounded by 90 s; the figure returned says how long it took.
        leads.wait(
            lambda records: records[-1].holder == other and records[-1].renewal >= 1, timeout=90
        )
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
            logs[name] = stop(process)
    assert processes[other].returncode == 0, logs[other]
    assert f"replica {other} leads (term {new_term})" in logs[other], logs[other]
    return took


# --- Replicas that split the report shards ------------------------------------------------

GATEWAYS = [f"gw-{i:02d}" for i in range(1, 7)]  # 01-04 fall to ctl-b's shards, 05-06 to ctl-a's


class ShardWatch:
    """What any operator sees (MQTT 3.1.1, paho): the verified shard leases, every device's
    drift status, every group's status and every drift event, in arrival order."""

    def __init__(self, url: str, prefix: str, public_key_pem: bytes) -> None:
        self.topics = Topics(prefix)
        self.trusted = envelopes.trusted_keys([envelopes.load_public_key(public_key_pem)])
        self.holders: dict[str, LeaderRecord] = {}
        self.released: list[tuple[str, str]] = []  # (shard, by replica), in order
        self.history: dict[str, list[LeaderRecord]] = {}  # every record, per shard
        self.members: dict[str, bool] = {}  # replica -> its membership record retained
        self.drift: dict[str, DriftStatus] = {}
        self.groups: dict[str, GroupStatus] = {}
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-shards-{secrets.token_hex(4)}"
        )
        self._client.on_connect = lambda client, *_: client.subscribe(
            [
                (self.topics.all_controller_shards(), 1),
                (self.topics.all_controller_replicas(), 1),
                (self.topics.all_drift(), 1),
                (self.topics.all_group_status(), 1),
                (self.topics.event("drift"), 1),
            ]
        )
        self._client.on_message = self._on_message
        self._client.connect(*host_port(url))
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        with self._cond:
            shard = message.topic.rpartition("/")[2]
            if message.topic.startswith(self.topics.all_controller_shards()[:-1]):
                verified = envelopes.verify_signed(
                    payload, self.trusted, payload_type=envelopes.SHARD_LEASE_TYPE
                )
                record = self.holders[shard] = leader.decode(verified.payload)
                self.history.setdefault(shard, []).append(record)
                if record.lease_ms == 1:
                    self.released.append((shard, record.holder))
            elif message.topic.startswith(self.topics.all_controller_replicas()[:-1]):
                self.members[shard] = bool(payload)
            else:
                ref = self.topics.parse(message.topic)
                if ref.kind == "device-drift" and payload:
                    self.drift[ref.name] = status.drift_from_json(payload)
                elif ref.kind == "group-status" and payload:
                    self.groups[ref.name] = status.group_status_from_json(payload)
                elif ref.kind == "event":
                    self.events.append(status.event_from_json(payload))
            self._cond.notify_all()

    def owners(self) -> dict[str, set[str]]:
        """Per replica, the shards whose lease it holds and renewed (lease not released)."""
        out: dict[str, set[str]] = {}
        for shard, record in self.holders.items():
            if record.lease_ms > 1 and record.renewal >= 1:
                out.setdefault(record.holder, set()).add(shard)
        return out

    def drift_events(self, device: str) -> list[tuple[str, str]]:
        return [(e["change"], e["state"]) for e in self.events if e.get("device") == device]

    def drifted(self) -> list[str]:
        """The devices of every event that told a drift, in order."""
        return [e["device"] for e in self.events if e["state"] == "drifted"]

    def assert_nothing_told_twice(self) -> None:
        for device in {e["device"] for e in self.events}:
            told = self.drift_events(device)
            assert all(a != b for a, b in itertools.pairwise(told)), (device, told)

    def state(self, device: str) -> str | None:
        found = self.drift.get(device)
        return found.state if found else None

    def wait(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        with self._cond:
            ok = self._cond.wait_for(predicate, timeout)
            assert ok, (
                {d: s.state for d, s in self.drift.items()},
                [(e.get("device"), e.get("change")) for e in self.events],
                {s: (r.holder, r.renewal) for s, r in self.holders.items()},
            )

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


class Reporter:
    """Devices of the test: each reports what its retained bundles say (retained, QoS 1, on
    its shard's topic, as an agent does), or that one resource was edited by hand."""

    def __init__(self, url: str, prefix: str, seen: Subscriber) -> None:
        self.topics = Topics(prefix)
        self.seen = seen
        self.seq: dict[str, int] = {}
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-devices-{secrets.token_hex(4)}"
        )
        self._client.connect(*host_port(url))
        self._client.loop_start()

    def report(self, device: str, edited: str | None = None) -> None:
        own = self.seen.bundle(f"device/{device}")
        assert own is not None and own.group is not None, device
        group = self.seen.bundle(f"group/{own.group}")
        assert group is not None, own.group
        self.seq[device] = self.seq.get(device, 0) + 1
        resources = tuple(
            ResourceReport(r.id, r.kind, "drifted", "0" * 64, "edited by hand")
            if r.id == edited
            else ResourceReport(r.id, r.kind, "ok", bundles.resource_digest(r))
            for r in bundles.effective(group, own)
        )
        report = Report(
            device=device, time=int(time.time()), seq=self.seq[device], shim_version="e2e",
            mode=group.mode, group=group.target,
            applied_group=Applied(group.target, group.version, group.commit,
                                  group.content_digest()),
            applied_device=Applied(device, own.version, own.commit, own.content_digest()),
            resources=resources,
        )  # fmt: skip
        info = self._client.publish(
            self.topics.device_reported(device), reports.encode(report), qos=1, retain=True
        )
        info.wait_for_publish(10)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def add_gateways(fleet: dict[str, Path]) -> None:
    for device in GATEWAYS[1:]:
        (fleet["repo"] / "devices" / f"{device}.yaml").write_text("group: gateways\n")
    git(fleet["repo"], "add", "-A")
    git(fleet["repo"], "commit", "-qm", "more gateways")


def split_shards_and_edit_by_hand(
    fleet: dict[str, Path],
    urls: dict[str, str],
    watch_url: str,
    prefix: str,
    *,
    kill: bool = True,
) -> dict[str, float]:
    """Two replicas split the 16 shards; hand edits on devices of each are told once, by
    the device's owner, and the leader's group summary counts them. With ``kill``, the
    owner of an edited device is killed with SIGKILL: its shards move to the other replica,
    an edit made meanwhile is told once, nothing is told twice, versions never go back.
    Returns the figures measured (seconds)."""
    add_gateways(fleet)
    pub = fleet["pub"].read_bytes()
    seen = Subscriber(*host_port(watch_url), prefix, pub)
    watch = ShardWatch(watch_url, prefix, pub)
    names = sorted(urls)
    started = time.monotonic()
    processes = {name: replica(fleet, url, prefix, name) for name, url in urls.items()}
    devices = Reporter(watch_url, prefix, seen)
    figures: dict[str, float] = {}
    try:
        targets = ALL | {f"device/{d}" for d in GATEWAYS}
        seen.wait(lambda: set(seen.payloads) == targets, timeout=60)
        # Each replica owns the shards it ranks first for, and no more.
        expected = {n: {s for s in SHARDS if rank(s, names)[0] == n} for n in names}
        watch.wait(lambda: watch.owners() == expected, timeout=60)
        figures["split"] = time.monotonic() - started
        mine = {n: [d for d in GATEWAYS if shard_of(d) in expected[n]] for n in names}
        assert all(mine.values()), mine  # each replica owns some of the devices
        for device in GATEWAYS:
            devices.report(device)
        watch.wait(lambda: all(watch.state(d) == "in_sync" for d in GATEWAYS))
        watch.wait(lambda: (g := watch.groups.get("gateways")) is not None
                   and g.counts.get("in_sync") == len(GATEWAYS))  # fmt: skip
        # A hand edit on a device of each replica: one event each.
        edited = [mine[n][0] for n in names]
        for device in edited:
            devices.report(device, edited="uplink-interval")
        watch.wait(lambda: all(watch.state(d) == "drifted" for d in edited))
        watch.wait(lambda: watch.groups["gateways"].counts.get("drifted") == len(edited))
        time.sleep(2 * float(LEASE_S))  # room for a second event, if one were coming
        # One event each, from the device's owner; no replica told another's device.
        assert sorted(watch.drifted()) == sorted(edited), watch.events
        watch.assert_nothing_told_twice()
        if not kill:
            return figures

        victim = max(names, key=lambda n: len(mine[n]))  # with a device left to edit
        survivor = next(n for n in names if n != victim)
        versions_before = {t: seen.bundle(t).version for t in targets}  # type: ignore[union-attr]
        processes[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # A hand edit on another of the victim's devices, during the handoff.
        during = mine[victim][1]
        devices.report(during, edited="uplink-interval")
        watch.wait(lambda: watch.state(during) == "drifted", timeout=60)
        figures["edit-seen-after-kill"] = time.monotonic() - killed
        watch.wait(lambda: watch.owners().get(survivor) == set(SHARDS), timeout=60)
        figures["all-shards-after-kill"] = time.monotonic() - killed
        watch.wait(lambda: watch.groups["gateways"].counts.get("drifted") == len(edited) + 1)
        # And one after the handoff, by the survivor.
        after = mine[victim][2]
        devices.report(after, edited="uplink-interval")
        watch.wait(lambda: watch.state(after) == "drifted")
        watch.wait(lambda: watch.groups["gateways"].counts.get("drifted") == len(edited) + 2)
        time.sleep(2 * float(LEASE_S))
        # The takeover told nothing again: one drift event per hand edit, none repeated.
        assert sorted(watch.drifted()) == sorted([*edited, during, after]), watch.events
        watch.assert_nothing_told_twice()
        # The bundles: nothing published twice, no version went back.
        for target in targets:
            bundle = seen.bundle(target)
            assert bundle is not None and bundle.version == versions_before[target], target
        assert sorted(published(seen)) == sorted((t.split("/")[1], 1) for t in targets)
        return figures
    finally:
        devices.close()
        watch.close()
        seen.close()
        logs = {}
        for name, process in processes.items():
            logs[name] = stop(process)
        for name, process in processes.items():
            assert process.returncode in (0, -signal.SIGKILL), logs[name]
