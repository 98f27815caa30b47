"""Sealed secrets end to end, against real processes: the ``setpoint`` CLI (keygen, seal,
reseal, validate), real git, the real controller and real shim processes, a real mosquitto.

What is attacked: the secret's confidentiality everywhere but on the device it was sealed
for. Every byte the fleet produced (git objects, the controller's state directory and
audit log, every log, the metrics, every retained message, drift and status JSON) is
searched for the plaintext and for its SHA-256 (a short secret's unkeyed hash can be
brute-forced, so that must not leave the device either).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pyrage
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.proto import bundles, envelopes
from setpoint.proto.topics import Topics

pytestmark = pytest.mark.broker

TIMEOUT = 60.0
ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Ops",
    "GIT_AUTHOR_EMAIL": "ops@example.com",
    "GIT_COMMITTER_NAME": "Ops",
    "GIT_COMMITTER_EMAIL": "ops@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}
GROUPS = {
    "kiosks": "mode: enforce\nresources:\n  - {id: motd, kind: file, path: etc/motd,"
    " content: hi}\n",
    "gates": "mode: enforce\nresources: []\n",
}


def setpoint(
    *args: str, stdin: bytes | None = None, check: bool = True, stdout_only: bool = False
) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "setpoint", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        env=ENV,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"setpoint {' '.join(args)}: {done.returncode}\n{done.stderr!r}")
    return (done.stdout if stdout_only else done.stdout + done.stderr).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Wire:
    """Everything retained or published under the prefix, as any subscriber would see it."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.topics = Topics(prefix)
        self.cond = threading.Condition()
        self.messages: list[tuple[str, bytes]] = []
        self.latest: dict[str, bytes] = {}
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"wire-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(f"{prefix}/#", qos=1)
        assert subscribed.wait(TIMEOUT)

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((message.topic, bytes(message.payload)))
            self.latest[message.topic] = bytes(message.payload)
            self.cond.notify_all()

    def drift(self, device: str) -> dict[str, Any] | None:
        data = self.latest.get(self.topics.device_drift(device))
        return json.loads(data) if data else None

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out waiting for {what}: {self.latest.keys()}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Rig:
    """A fleet repository, its controller and one real shim process per device."""

    def __init__(self, tmp: Path, broker: Any, prefix: str) -> None:
        self.tmp, self.broker, self.prefix = tmp, broker, prefix
        self.repo = tmp / "fleet"
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.metrics = free_port()
        self.git("init", "-q", "-b", "main", str(self.repo), cwd=tmp)
        for name, text in GROUPS.items():
            self.write(f"groups/{name}.yaml", text)
        setpoint("keys", "generate", "--out", str(tmp / "keys"))
        self.wire = Wire(broker.host, broker.port, prefix)

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return subprocess.run(
            ["git", "-c", "commit.gpgsign=false", *args],
            cwd=cwd or self.repo,
            env=ENV,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def write(self, name: str, text: str) -> None:
        path = self.repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def state(self, device: str) -> Path:
        return self.tmp / "devices" / device / "state"

    def root(self, device: str) -> Path:
        return self.tmp / "devices" / device / "root"

    def identity(self, device: str) -> Any:
        """The device's age identity, as a thief who copied its state directory has it."""
        lines = (self.state(device) / "age-identity").read_text().splitlines()
        return pyrage.x25519.Identity.from_str(next(x for x in lines if x.startswith("AGE-")))

    def add_device(self, device: str, group: str) -> str:
        """Keygen on the device (the real CLI), its recipient committed in its file."""
        state = str(self.state(device))
        recipient = setpoint("shim", "keygen", "--state-dir", state, stdout_only=True).strip()
        self.write(f"devices/{device}.yaml", f"group: {group}\nrecipient: {recipient}\n")
        return recipient

    def seal(self, *args: str, plaintext: bytes, verb: str = "seal") -> str:
        return setpoint(
            "secrets", verb, "--repo", str(self.repo), "--from-stdin", *args, stdin=plaintext
        )

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def start_controller(self) -> None:
        self._start(
            "controller",
            "controller", "--repo", str(self.repo), "--broker", self.broker.url,
            "--prefix", self.prefix, "--key", str(self.tmp / "keys" / "signing.key"),
            "--state-dir", str(self.tmp / "controller-state"), "--grace", "30",
            "--tick", "0.2", "--metrics-listen", f"127.0.0.1:{self.metrics}",
            "--log-level", "DEBUG",
        )  # fmt: skip

    def start_shim(self, device: str) -> None:
        self.root(device).mkdir(parents=True, exist_ok=True)
        self._start(
            f"shim-{device}",
            "shim", "--device", device, "--broker", self.broker.url, "--prefix", self.prefix,
            "--trust", str(self.tmp / "keys" / "signing.pub"), "--root", str(self.root(device)),
            "--state-dir", str(self.state(device)), "--observe-interval", "0.2",
            "--log-level", "DEBUG",
        )  # fmt: skip

    def _start(self, name: str, *args: str) -> None:
        with (self.logs / f"{name}.log").open("wb") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "setpoint", *args], stdout=out, stderr=out, env=ENV
            )

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        proc.wait(timeout=30)

    def in_sync(self, device: str, commit: str) -> Callable[[], bool]:
        def check() -> bool:
            drift = self.wire.drift(device)
            return bool(drift) and drift["state"] == "in_sync" and drift["commit"] == commit  # type: ignore[index]

        return check

    def wait_in_sync(self, commit: str, *devices: str) -> None:
        for device in devices:
            self.wire.wait(self.in_sync(device, commit), f"{device} in_sync on {commit[:12]}")

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        self.wire.close()


@pytest.fixture
def rig(broker: Any, unique_prefix: str, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, broker, unique_prefix)
    try:
        yield r
    finally:
        r.close()


def needles(*plaintexts: bytes) -> dict[bytes, str]:
    out = {}
    for text in plaintexts:
        out[text] = f"plaintext {text[:6]!r}..."
        out[hashlib.sha256(text).hexdigest().encode()] = f"sha256 of {text[:6]!r}..."
        out[hashlib.sha256(text).digest()] = f"raw sha256 of {text[:6]!r}..."
    return out


def find(haystacks: dict[str, bytes], wanted: dict[bytes, str]) -> list[str]:
    return [f"{what} in {where}" for where, data in haystacks.items() for n, what in wanted.items()
            if n in data]  # fmt: skip


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def sealed_values(payload: bytes) -> list[Any]:
    """The sealed values in a retained bundle envelope (none for anything else)."""
    try:
        inner = envelopes.decode(payload).payload
        bundle = bundles.decode(inner)
    except Exception:
        return []
    return [r.sealed for r in bundle.resources if getattr(r, "sealed", None) is not None]


def test_sealed_file_converges_drifts_heals_and_its_plaintext_is_nowhere_but_on_the_devices(
    rig: Rig,
) -> None:
    api_key = b"api-" + secrets.token_hex(6).encode() + b"\n"
    psk = b"psk-" + secrets.token_hex(6).encode()
    for device, group in (("k1", "kiosks"), ("k2", "kiosks"), ("g1", "gates")):
        rig.add_device(device, group)
    rig.seal("--group", "kiosks", "--resource", "api-key", "--path", "etc/api.key", "--write",
             plaintext=api_key)  # fmt: skip
    rig.seal("--group", "gates", "--resource", "psk", "--key", "wifi_psk", "--write",
             plaintext=psk + b"\n")  # fmt: skip
    commit = rig.commit("sealed secrets for both groups")
    rig.start_controller()
    for device in ("k1", "k2", "g1"):
        rig.start_shim(device)
    rig.wait_in_sync(commit, "k1", "k2", "g1")

    for device in ("k1", "k2"):
        path = rig.root(device) / "etc" / "api.key"
        assert path.read_bytes() == api_key
        assert path.stat().st_mode & 0o777 == 0o600
    settings = rig.root("g1") / ".setpoint" / "settings.json"
    assert json.loads(settings.read_text()) == {"wifi_psk": psk.decode()}

    # A hand edit: drift is seen (without the plaintext), enforce mode heals it.
    (rig.root("k1") / "etc" / "api.key").write_bytes(b"edited\n")
    rig.wire.wait(
        lambda: any(
            t == rig.wire.topics.device_drift("k1") and json.loads(p)["state"] == "drifted"
            for t, p in rig.wire.messages
        ),
        "k1 drifted",
    )
    rig.wait_in_sync(commit, "k1")
    assert (rig.root("k1") / "etc" / "api.key").read_bytes() == api_key

    status = setpoint("status", "--broker", rig.broker.url, "--prefix", rig.prefix, "--json")
    with urllib.request.urlopen(f"http://127.0.0.1:{rig.metrics}/metrics", timeout=30) as r:
        metrics = r.read()
    objects = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch"],
        cwd=rig.repo, capture_output=True, check=True,
    ).stdout  # fmt: skip
    rig.stop("controller")
    for device in ("k1", "k2", "g1"):
        rig.stop(f"shim-{device}")
    haystacks = {
        "git objects": objects,
        "metrics": metrics,
        "setpoint status --json": status.encode(),
        **{f"retained {t}": p for t, p in rig.wire.latest.items()},
        **{f"message {n} on {t}": p for n, (t, p) in enumerate(rig.wire.messages)},
        **tree_bytes(rig.tmp / "controller-state"),
        **tree_bytes(rig.logs),
    }
    assert (rig.tmp / "controller-state" / "audit.jsonl").read_bytes()  # it was searched
    assert any("drift" in k for k in haystacks) and any("status" in k for k in haystacks)
    assert find(haystacks, needles(api_key, api_key.strip(), psk)) == []
    # The check can fail: the devices do hold the plaintext.
    assert find(tree_bytes(rig.root("k1")), needles(api_key)) != []


def test_device_b_holding_every_retained_bundle_cannot_recover_device_a_secret(rig: Rig) -> None:
    secret_a = b"only-for-a-" + secrets.token_hex(6).encode()
    rig.add_device("a", "kiosks")
    rig.add_device("b", "gates")
    rig.seal("--device", "a", "--resource", "token", "--key", "token", "--write",
             plaintext=secret_a)  # fmt: skip
    rig.seal("--group", "kiosks", "--resource", "group-token", "--key", "group_token", "--write",
             plaintext=secret_a + b"-group")  # fmt: skip
    commit = rig.commit("a secret for a, one for its group")
    rig.start_controller()
    rig.start_shim("a")
    rig.start_shim("b")
    rig.wait_in_sync(commit, "a", "b")
    assert json.loads((rig.root("a") / ".setpoint" / "settings.json").read_text()) == {
        "group_token": (secret_a + b"-group").decode(),
        "token": secret_a.decode(),
    }

    # B holds every retained bundle of the fleet (more than the ACL gives it) and its identity.
    stolen = [p for t, p in rig.wire.latest.items() if t.endswith("/desired")]
    values = [v for p in stolen for v in sealed_values(p)]
    assert len(values) == 2
    identity_b = rig.identity("b")
    for value in values:
        with pytest.raises(pyrage.DecryptError):
            pyrage.decrypt(value.armor.encode(), [identity_b])
    assert find({f"bundle {n}": p for n, p in enumerate(stolen)}, needles(secret_a)) == []


def test_device_added_without_reseal_is_warned_refuses_and_changes_nothing(rig: Rig) -> None:
    secret = b"join-" + secrets.token_hex(6).encode()
    rig.add_device("k1", "kiosks")
    rig.seal("--group", "kiosks", "--resource", "token", "--path", "etc/token", "--write",
             plaintext=secret)  # fmt: skip
    first = rig.commit("sealed for k1")
    rig.start_controller()
    rig.start_shim("k1")
    rig.wait_in_sync(first, "k1")

    rig.add_device("k2", "kiosks")  # joins the group; nobody reseals
    warned = setpoint("validate", str(rig.repo))
    assert (
        "warning: groups/kiosks.yaml: resource 'token': not sealed for device(s) k2, which will"
        " refuse the bundle (not-a-recipient) until it is resealed: setpoint secrets reseal"
        " --group kiosks --resource token"
    ) in warned
    second = rig.commit("k2 joins the kiosks")
    rig.start_shim("k2")

    def rejected() -> bool:
        drift = rig.wire.drift("k2")
        return bool(drift) and drift["state"] == "rejected"  # type: ignore[index]

    rig.wire.wait(rejected, "k2 rejected")
    drift = rig.wire.drift("k2")
    assert drift is not None and "not-a-recipient" in drift["reason"]
    assert [p.name for p in rig.root("k2").iterdir()] in ([], [".setpoint"])
    assert not (rig.root("k2") / "etc").exists()
    log = rig.logs / "controller.log"
    deadline = time.monotonic() + TIMEOUT  # a file has no event to wait on: poll it
    while "not sealed for device(s) k2" not in log.read_text():
        assert time.monotonic() < deadline, "the controller never logged the warning"
        time.sleep(0.05)

    rig.seal("--group", "kiosks", "--resource", "token", plaintext=secret, verb="reseal")
    assert "warning" not in setpoint("validate", str(rig.repo))
    third = rig.commit("reseal for k1 and k2")
    assert third != second
    rig.wait_in_sync(third, "k1", "k2")
    assert (rig.root("k2") / "etc" / "token").read_bytes() == secret


def test_rotation_reaches_every_device_and_a_removed_device_cannot_read_the_new_secret(
    rig: Rig,
) -> None:
    old, new = (b"rot-" + secrets.token_hex(6).encode() for _ in range(2))
    for device in ("k1", "k2", "k3"):
        rig.add_device(device, "kiosks")
    rig.seal("--group", "kiosks", "--resource", "token", "--key", "token", "--write",
             plaintext=old)  # fmt: skip
    first = rig.commit("sealed for three")
    rig.start_controller()
    for device in ("k1", "k2"):
        rig.start_shim(device)
    rig.wait_in_sync(first, "k1", "k2")

    # k3 leaves the fleet; the secret is rotated and resealed for the devices that remain.
    (rig.repo / "devices" / "k3.yaml").unlink()
    rig.seal("--group", "kiosks", "--resource", "token", plaintext=new, verb="reseal")
    second = rig.commit("k3 removed; token rotated")
    rig.wait_in_sync(second, "k1", "k2")
    for device in ("k1", "k2"):
        settings = json.loads((rig.root(device) / ".setpoint" / "settings.json").read_text())
        assert settings == {"token": new.decode()}

    group = rig.wire.latest[rig.wire.topics.group_desired("kiosks")]
    [value] = sealed_values(group)
    identity_k3 = rig.identity("k3")
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(value.armor.encode(), [identity_k3])


def test_plaintext_secret_in_a_group_file_never_reaches_the_broker(rig: Rig) -> None:
    """Issue 17, finding 5: a ``secret: true`` plaintext in a group file was published in the
    group's bundle, which every device may read (decision 0004). Now the controller refuses
    the file, keeps the last good bundle, and nothing on the wire carries the value."""
    leaked = b"group-plaintext-" + secrets.token_hex(6).encode()
    rig.write("devices/k1.yaml", "group: kiosks\n")  # no sealing here: this runs on old code too
    first = rig.commit("kiosks")
    rig.start_controller()
    rig.start_shim("k1")
    rig.wait_in_sync(first, "k1")
    before = rig.wire.latest[rig.wire.topics.group_desired("kiosks")]

    rig.write(
        "groups/kiosks.yaml",
        GROUPS["kiosks"]
        + f"  - {{id: api, kind: setting, key: api, value: {leaked.decode()}, secret: true}}\n",
    )
    rig.commit("a plaintext secret in a group file")
    group, error = (
        rig.wire.topics.group_desired("kiosks"),
        rig.wire.topics.event("repository-error"),
    )
    rig.wire.wait(
        lambda: (
            rig.wire.latest[group] != before
            or any(t == error and b"secret: true" in p for t, p in rig.wire.messages)
        ),
        "the controller's decision: a new group bundle, or a repository-error event",
    )
    # What any device of the fleet could read (every group's bundle, decision 0004):
    wire = {f"{t} #{n}": p for n, (t, p) in enumerate(rig.wire.messages)}
    assert find(wire, needles(leaked)) == []
    assert rig.wire.latest[group] == before
    refused = setpoint("validate", str(rig.repo), check=False)
    assert "'secret: true' with a plaintext value in a group file" in refused


def test_the_wire_check_can_fail(rig: Rig) -> None:
    """The search above finds a plaintext that is on the wire (a device-file plaintext
    secret, allowed by fleet.yaml): proof that an empty result means something."""
    leaked = b"allowed-plaintext-" + secrets.token_hex(6).encode()
    rig.write("fleet.yaml", "allow_plaintext_secret: true\n")
    rig.write(
        "devices/k1.yaml",
        "group: kiosks\nresources:\n"
        f"  - {{id: api, kind: setting, key: api, value: {leaked.decode()}, secret: true}}\n",
    )
    commit = rig.commit("plaintext, allowed")
    rig.start_controller()
    rig.start_shim("k1")
    rig.wait_in_sync(commit, "k1")
    assert find(dict(rig.wire.latest.items()), needles(leaked)) != []
