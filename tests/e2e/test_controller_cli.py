"""The controller's verbs end to end: the real ``setpoint`` command, real git, real mosquitto.

``init``, ``validate``, ``controller`` (``--once`` and running until SIGTERM), ``history``;
what reaches the broker is checked with a plain paho subscriber that verifies every
bundle with ``signing.pub``, as a third-party tool would.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from setpoint.controller import examples
from setpoint.proto import bundles, envelopes
from setpoint.proto.bundles import Bundle
from setpoint.proto.topics import Topics
from setpoint.proto.trust import PAYLOAD_TYPES

ALL = {"group/kiosks", "group/gateways", "device/kiosk-01", "device/gw-01"}
ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Bob",
    "GIT_AUTHOR_EMAIL": "bob@example.com",
    "GIT_COMMITTER_NAME": "Bob",
    "GIT_COMMITTER_EMAIL": "bob@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def setpoint(
    *args: str, check: bool = False, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "setpoint", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        check=False,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"setpoint {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


class Subscriber:
    """A plain paho client holding the latest retained bundle of every desired topic."""

    def __init__(self, host: str, port: int, prefix: str, public_key_pem: bytes) -> None:
        self.topics = Topics(prefix)
        self.trusted = envelopes.trusted_keys([envelopes.load_public_key(public_key_pem)])
        self.payloads: dict[str, bytes] = {}
        self.arrivals: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-{secrets.token_hex(4)}"
        )
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.connect(host, port)
        self._client.loop_start()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(
            [
                (self.topics.all_group_desired(), 1),
                (self.topics.all_device_desired(), 1),
                (self.topics.all_events(), 1),
            ]
        )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        ref = self.topics.parse(message.topic)
        if ref.kind == "event":
            with self._cond:
                self.events.append(json.loads(message.payload))
                self._cond.notify_all()
            return
        target = f"{'group' if ref.kind == 'group-desired' else 'device'}/{ref.name}"
        with self._cond:
            self.arrivals.append(target)
            if message.payload:
                self.payloads[target] = bytes(message.payload)
            else:
                self.payloads.pop(target, None)
            self._cond.notify_all()

    def bundle(self, target: str) -> Bundle | None:
        payload = self.payloads.get(target)
        if payload is None:
            return None
        kind = target.split("/")[0]
        verified = envelopes.verify(payload, self.trusted, payload_type=PAYLOAD_TYPES[kind])
        return bundles.decode(verified)

    def wait(self, predicate: Callable[[], bool], timeout: float = 15) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), "timed out"

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


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


def controller_once(
    fleet: dict[str, Path], broker: Any, prefix: str, repo: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``setpoint controller --once`` on ``repo`` (default: the fleet's), its own state dir."""
    return setpoint(
        "controller", "--repo", str(repo or fleet["repo"]), "--broker", broker.url,
        "--key", str(fleet["key"]), "--state-dir", str(fleet["state"]), "--prefix", prefix,
        "--once", "--timeout", "30",
    )  # fmt: skip


def test_init_creates_a_committed_example_that_validates(tmp_path: Path) -> None:
    result = setpoint("init", str(tmp_path / "fleet"), check=True)
    assert "groups/kiosks.yaml" in result.stdout
    assert git(tmp_path / "fleet", "log", "--format=%an|%s") == (
        "setpoint init|Example fleet (setpoint init)"
    )
    assert git(tmp_path / "fleet", "status", "--porcelain") == ""
    ok = setpoint("validate", str(tmp_path / "fleet"))
    assert ok.returncode == 0 and "ok: 2 group(s), 2 device(s)" in ok.stdout
    again = setpoint("init", str(tmp_path / "fleet"))
    assert again.returncode == 1 and "not empty" in again.stderr


def test_init_with_a_relative_path_commits_the_files(tmp_path: Path) -> None:
    # The README's exact command: a relative path, run from a directory that is not the
    # repository (dulwich's `add` reads paths relative to the repository, not the cwd).
    (tmp_path / "work").mkdir()
    setpoint("init", "fleet/", check=True, cwd=tmp_path / "work")
    repo = tmp_path / "work" / "fleet"
    committed = git(repo, "ls-tree", "-r", "--name-only", "HEAD").splitlines()
    assert sorted(committed) == sorted(examples.FILES)
    assert git(repo, "status", "--porcelain") == ""
    checked = setpoint("validate", "fleet", "--rev", "main", cwd=tmp_path / "work")
    assert checked.returncode == 0, checked.stderr


def test_validate_reports_each_problem_and_exits_nonzero(fleet: dict[str, Path]) -> None:
    repo = fleet["repo"]
    (repo / "groups" / "kiosks.yaml").write_text(
        "resources:\n  - {id: motd, kind: fiel, path: etc/motd}\n"
    )
    (repo / "devices" / "kiosk-09.yaml").write_text("group: kiosk\n")
    bad = setpoint("validate", str(repo))
    assert bad.returncode == 1
    assert (
        "groups/kiosks.yaml:2: resource 'motd': unknown kind 'fiel' (known: command, file, setting)"
    ) in bad.stderr
    assert "devices/kiosk-09.yaml:1: group 'kiosk' does not exist" in bad.stderr
    as_json = json.loads(setpoint("validate", str(repo), "--json").stdout)
    assert not as_json["ok"] and len(as_json["problems"]) == 2
    assert {(p["file"], p["line"]) for p in as_json["problems"]} == {
        ("groups/kiosks.yaml", 2),
        ("devices/kiosk-09.yaml", 1),
    }
    committed = setpoint("validate", str(repo), "--rev", "main")
    assert committed.returncode == 0, committed.stderr


def test_validate_of_a_work_tree_names_what_is_not_committed(fleet: dict[str, Path]) -> None:
    repo = fleet["repo"]
    (repo / "devices" / "kiosk-03.yaml").write_text("group: kiosks\n")
    checked = setpoint("validate", str(repo))
    assert checked.returncode == 0  # the work tree is valid...
    assert (
        "note: not committed: devices/kiosk-03.yaml; the controller publishes commits only:"
        f" commit them, or check what is committed with `setpoint validate {repo} --rev main`"
    ) in checked.stderr  # ...but the controller does not see it yet
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "kiosk-03")
    assert "not committed" not in setpoint("validate", str(repo)).stderr


def test_validate_agrees_with_the_controller_on_an_empty_tree(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    empty = setpoint("validate", str(tmp_path / "empty"))
    assert empty.returncode == 1 and "ok" not in empty.stdout
    assert "no fleet.yaml, groups/ or devices/ at the top of the repository" in empty.stderr
    setpoint("init", str(tmp_path / "fleet"), check=True)
    repo = tmp_path / "fleet"
    git(repo, "rm", "-rq", "groups", "devices")
    git(repo, "commit", "-qm", "delete everything")
    committed = setpoint("validate", str(repo), "--rev", "main")
    assert committed.returncode == 1
    assert "fleet.yaml: the fleet has no groups and no devices" in committed.stderr
    assert "allow_empty: true" in committed.stderr


@pytest.mark.broker
def test_controller_once_publishes_verifiable_bundles_and_history(
    fleet: dict[str, Path],
    broker: Any,
    unique_prefix: str,
) -> None:
    common = [
        "--repo",
        str(fleet["repo"]),
        "--broker",
        broker.url,
        "--key",
        str(fleet["key"]),
        "--state-dir",
        str(fleet["state"]),
        "--prefix",
        unique_prefix,
    ]
    result = setpoint("controller", *common, "--once", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    seen = Subscriber(broker.host, broker.port, unique_prefix, fleet["pub"].read_bytes())
    try:
        seen.wait(lambda: set(seen.payloads) == ALL)
        head = git(fleet["repo"], "rev-parse", "HEAD")
        for target in ALL:
            bundle = seen.bundle(target)
            assert bundle is not None and bundle.version == 1 and bundle.commit == head
    finally:
        seen.close()
    again = setpoint("controller", *common, "--once", "--timeout", "30")
    assert again.returncode == 0 and "published" not in again.stderr
    history = setpoint("history", "--state-dir", str(fleet["state"]), check=True).stdout
    assert history.count(" change ") == len(ALL)
    lines = setpoint(
        "history", "kiosk-01", "--json", "--state-dir", str(fleet["state"]), check=True
    ).stdout.splitlines()
    [entry] = [json.loads(line) for line in lines]
    assert entry["target"] == "device/kiosk-01" and entry["commit"] == head
    assert entry["author"] == "setpoint init <setpoint@localhost>" and len(entry["digest"]) == 64


@pytest.mark.broker
def test_controller_once_with_a_broken_commit_exits_1(
    fleet: dict[str, Path],
    broker: Any,
    unique_prefix: str,
) -> None:
    (fleet["repo"] / "groups" / "kiosks.yaml").write_text("mode: sometimes\n")
    git(fleet["repo"], "commit", "-qam", "broken")
    result = controller_once(fleet, broker, unique_prefix)
    assert result.returncode == 1
    assert "groups/kiosks.yaml:1: mode: Input should be 'enforce' or 'observe'" in result.stderr


@pytest.mark.broker
def test_controller_once_on_an_empty_commit_exits_1_naming_it(
    tmp_path: Path, fleet: dict[str, Path], broker: Any, unique_prefix: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q", "-b", "main")
    git(empty, "commit", "-q", "--allow-empty", "-m", "nothing yet")
    head = git(empty, "rev-parse", "HEAD")
    result = controller_once(fleet, broker, unique_prefix, repo=empty)
    assert result.returncode == 1, result.stderr
    assert f"setpoint controller: main@{head[:12]} refused (1 problem(s), first: no fleet.yaml" in (
        result.stderr
    )


@pytest.mark.broker
def test_two_fleets_on_one_host_keep_their_own_state(
    tmp_path: Path, fleet: dict[str, Path], broker: Any, unique_prefix: str
) -> None:
    # Identical content, two repositories, one broker, two prefixes, no --state-dir: each
    # fleet gets its own commits, version floors and history.
    home = {**ENV, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    home.pop("SETPOINT_STATE_DIR", None)
    other = tmp_path / "other"
    setpoint("init", str(other), check=True)
    git(other, "commit", "-q", "--allow-empty", "-m", "same content, another commit")
    runs = {
        "a": (fleet["repo"], f"{unique_prefix}/a"),
        "b": (other, f"{unique_prefix}/b"),
    }

    def controller(repo: Path, prefix: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "setpoint", "controller", "--repo", str(repo), "--broker",
             broker.url, "--key", str(fleet["key"]), "--prefix", prefix, "--once",
             "--timeout", "30", *extra],
            capture_output=True, text=True, timeout=90, env=home, check=False,
        )  # fmt: skip

    for repo, prefix in runs.values():
        done = controller(repo, prefix)
        assert done.returncode == 0, done.stderr
    base = tmp_path / "xdg" / "setpoint" / "controller"
    dirs = sorted(p for p in base.iterdir())
    assert len(dirs) == 2 and all(p.name.startswith(("fleet-", "other-")) for p in dirs)
    for repo, prefix in runs.values():
        seen = Subscriber(broker.host, broker.port, prefix, fleet["pub"].read_bytes())
        try:
            seen.wait(lambda seen=seen: set(seen.payloads) == ALL)  # type: ignore[misc]
            head = git(repo, "rev-parse", "HEAD")
            for target in ALL:
                bundle = seen.bundle(target)
                assert bundle is not None and bundle.version == 1 and bundle.commit == head
        finally:
            seen.close()
    for state in dirs:
        recorded = json.loads((state / "fleet.json").read_text())
        repo, prefix = runs["a" if state.name.startswith("fleet-") else "b"]
        assert recorded == {"repository": str(repo), "broker": broker.url, "prefix": prefix}
        history = setpoint("history", "--json", "--state-dir", str(state), check=True).stdout
        commits = {json.loads(line)["commit"] for line in history.splitlines()}
        assert commits == {git(repo, "rev-parse", "HEAD")}
    # A state directory of one fleet refuses another, naming both and the fix.
    a_dir = next(p for p in dirs if p.name.startswith("fleet-"))
    refused = controller(other, f"{unique_prefix}/b", "--state-dir", str(a_dir))
    assert refused.returncode == 2
    assert f"state directory {a_dir} belongs to another fleet (repository {fleet['repo']}" in (
        refused.stderr
    )
    assert f"not this one (repository {other}, broker {broker.url}, prefix" in refused.stderr
    assert "give this controller its own --state-dir" in refused.stderr
    several = subprocess.run(
        [sys.executable, "-m", "setpoint", "history"],
        capture_output=True, text=True, env=home, check=False,
    )  # fmt: skip
    assert several.returncode == 2 and "several fleets have a state directory" in several.stderr


def test_controller_without_a_key_says_how_to_make_one(tmp_path: Path) -> None:
    setpoint("init", str(tmp_path / "fleet"), check=True)
    result = setpoint(
        "controller",
        "--repo",
        str(tmp_path / "fleet"),
        "--broker",
        "mqtt://127.0.0.1:1",
        "--key",
        str(tmp_path / "none.key"),
        "--state-dir",
        str(tmp_path / "state"),
        "--once",
    )
    assert result.returncode == 2
    assert "setpoint keys generate" in result.stderr


def refused_flags(tmp_path: Path, *flags: str) -> str:
    """``setpoint controller`` on a fresh fleet with ``flags``: it must exit 2 before it
    touches the broker or the key; its stderr."""
    setpoint("init", str(tmp_path / "fleet"), check=True)
    result = setpoint(
        "controller",
        "--repo",
        str(tmp_path / "fleet"),
        "--broker",
        "mqtt://127.0.0.1:1",
        "--state-dir",
        str(tmp_path / "state"),
        *flags,
        "--key",
        str(tmp_path / "none.key"),
    )
    assert result.returncode == 2, result.stderr
    return result.stderr


def test_controller_refuses_a_resend_after_not_under_the_grace(tmp_path: Path) -> None:
    stderr = refused_flags(tmp_path, "--grace", "60", "--resend-after", "90")
    assert "--resend-after 90 is not under --grace 60" in stderr
    assert "use a smaller --resend-after" in stderr


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("10", "--slow-ack 10 is not under 10s, the time the controller waits for any"),
        ("-1", "argument --slow-ack: '-1': use a number of seconds, e.g. 3 (0: never"),
        ("soon", "argument --slow-ack: 'soon': use a number of seconds, e.g. 3 (0: never"),
    ],
)
def test_controller_refuses_a_slow_ack_it_cannot_use(
    tmp_path: Path, value: str, error: str
) -> None:
    stderr = refused_flags(tmp_path, f"--slow-ack={value}")
    assert error in stderr, stderr
    if value == "10":
        assert "use a smaller --slow-ack (default 3), or 0 to never read" in stderr


@pytest.mark.broker
def test_commit_reaches_the_broker_and_sigterm_stops_cleanly(
    fleet: dict[str, Path],
    broker: Any,
    unique_prefix: str,
) -> None:
    """The issue's "done means": a git commit changes the retained bundle of exactly the
    affected targets, seen by a plain MQTT client, verified with the fleet's public key."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "setpoint",
            "controller",
            "--repo",
            str(fleet["repo"]),
            "--broker",
            broker.url,
            "--key",
            str(fleet["key"]),
            "--state-dir",
            str(fleet["state"]),
            "--prefix",
            unique_prefix,
            "--log-json",
        ],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = Subscriber(broker.host, broker.port, unique_prefix, fleet["pub"].read_bytes())
    try:
        seen.wait(lambda: set(seen.payloads) == ALL)
        seen.wait(lambda: len(seen.arrivals) >= len(ALL))
        before = len(seen.arrivals)
        (fleet["repo"] / "devices" / "kiosk-01.yaml").write_text(
            "group: kiosks\nvars:\n  site: entrance\n"
        )
        git(fleet["repo"], "commit", "-qam", "kiosk-01 at the entrance")
        commit = git(fleet["repo"], "rev-parse", "HEAD")
        seen.wait(lambda: (b := seen.bundle("device/kiosk-01")) is not None and b.version == 2)
        bundle = seen.bundle("device/kiosk-01")
        assert bundle is not None and bundle.commit == commit
        assert bundle.vars == {"site": "entrance"}
        assert seen.arrivals[before:] == ["device/kiosk-01"]
        assert all(seen.bundle(t).version == 1 for t in ALL - {"device/kiosk-01"})  # type: ignore[union-attr]
        # Published means acknowledged, recorded in the audit log, then announced.
        seen.wait(
            lambda: any(
                e["target"] == "kiosk-01" and e["version"] == 2
                for e in seen.events
                if e["type"] == "published"
            )
        )
    finally:
        seen.close()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(r["message"] == "stopping" for r in records)
    assert any("published device/kiosk-01 v2" in r["message"] for r in records)
    assert not any(r["level"] == "error" for r in records)


def test_resend_after_defaults_to_half_of_a_short_grace(tmp_path: Path) -> None:
    """--grace 30 without --resend-after is accepted: the default (60) comes down to half of
    the grace, so a lost bundle is sent again before its device is overdue."""
    import argparse

    from setpoint.commands import controller as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    common = ["--repo", str(tmp_path), "--broker", "mqtt://127.0.0.1:1", "--key", "k"]
    short = parser.parse_args([*common, "--grace", "30"])
    command._config(short)
    assert short.resend_after == 15
    assert command._drift(short).resend_after == 15  # type: ignore[attr-defined]
    long = parser.parse_args([*common, "--grace", "300"])
    command._config(long)
    from setpoint.controller.resending import DEFAULT_RESEND_AFTER

    assert long.resend_after == DEFAULT_RESEND_AFTER == 60
