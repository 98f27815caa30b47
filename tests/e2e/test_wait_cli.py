"""``setpoint wait`` end to end: real mosquitto, the real controller, two real shims.

The example fleet of ``setpoint init`` is published by the controller; the two kiosks run
shims, the gateway does not. So the kiosks group converges, a commit to it converges again
(``--commit`` with a short id), and waiting for the whole fleet times out naming the
gateway that never reported.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).parent))

from clikit import SETPOINT, environment, git, run

from setpoint.commands.wait import Missing, judge
from setpoint.proto.repository import BranchStatus, Problem, RepositoryStatus
from setpoint.proto.status import DriftStatus, GroupStatus, ResourceDiff

pytestmark = pytest.mark.broker


class Fleet:
    def __init__(self, tmp_path: Path, broker: Any, prefix: str) -> None:
        self.home = tmp_path / "config"
        self.repo = tmp_path / "fleet"
        self.base = ["--broker", broker.url, "--prefix", prefix]
        self.tmp = tmp_path
        self.procs: list[tuple[subprocess.Popen[bytes], Any]] = []
        assert run(self.home, "init", str(self.repo)).returncode == 0
        # The example has one kiosk; a second one shows a group of two converging.
        (self.repo / "devices" / "kiosk-02.yaml").write_text("group: kiosks\n")
        git(self.repo, "add", "devices/kiosk-02.yaml")
        git(self.repo, "commit", "-qm", "a second kiosk")
        assert run(self.home, "keys", "generate", "--out", str(tmp_path / "keys")).returncode == 0

    def start(self, name: str, *args: str) -> None:
        log = (self.tmp / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [*SETPOINT, *args, *self.base], stdout=log, stderr=log, env=environment(self.home)
        )
        self.procs.append((proc, log))

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.tmp.glob("*.log"))

    def wait(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(self.home, "wait", *self.base, *args, timeout=180)

    def stop(self) -> None:
        for proc, log in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


@pytest.fixture
def fleet(broker: Any, unique_prefix: str, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path, broker, unique_prefix)
    keys = tmp_path / "keys"
    f.start("controller", "controller", "--repo", str(f.repo), "--key", str(keys / "signing.key"),
            "--state-dir", str(tmp_path / "state"), "--tick", "0.2")  # fmt: skip
    for device in ("kiosk-01", "kiosk-02"):
        root = tmp_path / device
        root.mkdir()
        f.start(device, "shim", "--device", device, "--trust", str(keys / "signing.pub"),
                "--root", str(root), "--state-dir", str(tmp_path / f"{device}-state"),
                "--observe-interval", "0.5")  # fmt: skip
    try:
        yield f
    finally:
        f.stop()


def test_wait_blocks_until_converged_and_names_what_is_missing(fleet: Fleet) -> None:
    done = fleet.wait("--group", "kiosks", "--timeout", "2m")
    assert done.returncode == 0, done.stderr + fleet.logs()
    assert "group kiosks converged: 2 device(s) in_sync" in done.stdout

    # A commit to the kiosks: wait on it by its short id, as CI would after a push.
    kiosks = fleet.repo / "groups" / "kiosks.yaml"
    kiosks.write_text(kiosks.read_text().replace("Welcome to", "Hello from"))
    git(fleet.repo, "commit", "-qam", "friendlier kiosks")
    short = git(fleet.repo, "rev-parse", "--short", "HEAD")
    done = fleet.wait("--group", "kiosks", "--commit", short, "--timeout", "2m", "--json")
    assert done.returncode == 0, done.stderr + fleet.logs()
    body = json.loads(done.stdout)
    assert body["converged"] is True and body["commit"] == short
    assert body["ready"] == ["kiosk-01", "kiosk-02"] and body["missing"] == []
    assert "Hello from" in (fleet.tmp / "kiosk-01" / "etc" / "motd").read_text()

    # The gateway has no shim: the whole fleet never converges, and wait says who and why.
    done = fleet.wait("--timeout", "3s")
    assert done.returncode == 1
    assert "setpoint wait: timed out after 3s: the fleet has not converged" in done.stderr
    assert "gw-01  gateways" in done.stderr
    assert "kiosk-01" not in done.stderr  # only what is missing is listed
    done = fleet.wait("--device", "kiosk-01", "--commit", "deadbeef", "--timeout", "2s", "--json")
    assert done.returncode == 1
    [missing] = json.loads(done.stdout)["missing"]
    assert missing["device"] == "kiosk-01" and "not deadbeef" in missing["why"]


def test_wait_refuses_bad_arguments(tmp_path: Path) -> None:
    home = tmp_path / "config"
    done = run(home, "wait", "--broker", "mqtt://127.0.0.1:1", "--timeout", "soon")
    assert done.returncode == 2 and "use a duration such as 90s, 5m or 1h" in done.stderr
    done = run(home, "wait", "--broker", "mqtt://127.0.0.1:1", "--commit", "HEAD")
    assert done.returncode == 2 and "first 4+ hex digits" in done.stderr
    done = run(home, "wait", "--broker", "mqtt://127.0.0.1:1", "--group", "Bad Name")
    assert done.returncode == 2 and "group id" in done.stderr
    done = run(home, "wait", "--group", "a", "--device", "b", "--broker", "mqtt://h:1")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


# The decision itself, without a broker.


def status(device: str, state: str = "in_sync", commit: str = "abc123" + "0" * 34) -> DriftStatus:
    why = (ResourceDiff("motd", "drifted: content differs"),) if state == "drifted" else ()
    return DriftStatus(device, "kiosks", state, 1, 1, commit, 0.0, why)


def summary(devices: int) -> GroupStatus:
    return GroupStatus("kiosks", 1, "abc123", "enforce", devices, {}, 0.0)


def test_judge_waits_for_devices_the_summary_counts_but_no_status_has_yet() -> None:
    verdict = judge([summary(3)], [status("k1"), status("k2")])
    assert not verdict.converged
    assert verdict.unjudged == ("group kiosks: 1 of 3 devices have no drift status yet",)
    assert judge([summary(2)], [status("k1"), status("k2")]).converged


def test_judge_lists_devices_not_in_sync_or_not_on_the_commit() -> None:
    verdict = judge(
        [summary(3)],
        [status("k1"), status("k2", "drifted"), status("k3", commit="f" * 40)],
        commit="abc1",
    )
    assert verdict.ready == ("k1",)
    assert verdict.missing == (
        Missing("k2", "kiosks", "drifted", "motd: drifted: content differs"),
        Missing("k3", "kiosks", "in_sync", "in sync on ffffffffffff, not abc1"),
    )


def test_judge_of_an_unknown_scope_never_converges() -> None:
    assert not judge([], []).converged
    assert not judge([summary(1)], [status("k1")], device="k9").converged
    assert not judge([summary(1)], [status("k1")], group="nope").converged
    assert judge([summary(1)], [status("k1")], device="k1").converged


def refused(head: str) -> RepositoryStatus:
    problem = Problem("groups/kiosks.yaml", 3, "resource 'motd': unknown kind 'fiel'")
    branch = BranchStatus("main", head, False, 100.0, "typo", (problem,))
    return RepositoryStatus({"main": branch})


def test_judge_gives_up_on_a_refused_commit() -> None:
    head = "abc123" + "0" * 34
    verdict = judge([summary(1)], [status("k1", commit="f" * 40)], commit="abc1",
                    repository=refused(head))  # fmt: skip
    assert verdict.final and not verdict.converged
    assert [b.head for b in verdict.refused] == [head]
    other = judge([summary(1)], [status("k1")], commit="abc1", repository=refused("9" * 40))
    assert other.converged and not other.refused


def test_wait_on_a_refused_commit_ends_at_once_with_the_problems(
    broker_session: Any, unique_prefix: str, tmp_path: Path
) -> None:
    from setpoint.proto.topics import Topics

    head = "abc123" + "0" * 34
    topics = Topics(unique_prefix)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker_session.host, broker_session.port)
    client.loop_start()
    try:
        client.publish(topics.repository_status(), refused(head).to_json(), qos=1,
                       retain=True).wait_for_publish(10)  # fmt: skip
    finally:
        client.disconnect()
        client.loop_stop()
    done = run(tmp_path / "config", "wait", "--commit", "abc123", "--timeout", "10m",
               "--broker", broker_session.url, "--prefix", unique_prefix, timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert (
        "setpoint wait: commit abc123000000 on main was refused by the controller; it will not"
        " converge: fix these and push again\n"
        "  groups/kiosks.yaml:3: resource 'motd': unknown kind 'fiel'"
    ) in done.stderr
