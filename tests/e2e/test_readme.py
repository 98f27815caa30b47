"""The README's "Using it" section, run as written: its shell blocks are this test's input.

The ```sh blocks under ``## Using it`` are read from README.md when the test runs (never
copied here) and run in a fresh temporary directory, with relative paths as written and the
virtualenv's ``bin`` first on ``PATH`` (where ``setpoint`` and ``python`` are). The README's
convention: a command under a ``# terminal N:`` comment keeps running (broker, controller,
shims, ``drift --follow``) and runs in the background; every other line runs in order and
must exit 0. ``PORT`` is the port the broker printed.

What a person does by looking, the test does by waiting on the broker (never on a clock):

* before each command once the controller and shims run, it waits until the controller has
  judged the repository's HEAD (the retained repository status) and every running device is
  ``in_sync`` on the versions retained for it;
* after a command that writes under a device's root (a hand edit), it waits until that
  device's drift is seen, then put back.

And it checks the story: 100% in sync, a commit that converges, a hand edit shown as drift
(also by the README's own ``drift --follow``), ``git revert``, convergence.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from setpoint.proto import bundles, envelopes, repository
from setpoint.proto import status as wire
from setpoint.proto.topics import DEFAULT_PREFIX, Topics
from setpoint.proto.trust import PAYLOAD_TYPES

pytestmark = pytest.mark.broker

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Using it"
TERMINAL = re.compile(r"#\s*terminal\s+\d+\b", re.IGNORECASE)
URL = re.compile(r"mqtt://127\.0\.0\.1:(\d+)")
WRITERS = frozenset({"rm", "touch", "sed", "chmod", "cp", "mv", "truncate", "tee", "echo"})
WAIT = 90.0  # generous: a loaded two-core machine shared with other test runs


@dataclass(frozen=True)
class Step:
    command: str
    background: bool


def steps(markdown: str) -> list[Step]:
    """The commands of the section's ```sh blocks, in order (continuations joined)."""
    start = markdown.index(f"\n{SECTION}\n")
    end = markdown.find("\n## ", start + len(SECTION) + 2)
    section = markdown[start : end if end != -1 else None]
    found: list[Step] = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        background = False
        pending = ""
        for line in block.splitlines():
            if not pending and not line.strip():
                continue
            if not pending and line.lstrip().startswith("#"):
                background = background or bool(TERMINAL.match(line.strip()))
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            found.append(Step(pending + line, background))
            pending, background = "", False
    return found


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def option(command: str, name: str) -> str | None:
    parts = words(command)
    return parts[parts.index(name) + 1] if name in parts else None


class Fleet:
    """What the README's programs retain on the broker, read by a plain paho client."""

    def __init__(self, port: int, prefix: str, trusted: dict[str, Any]) -> None:
        self.topics = Topics(prefix)
        self.trusted = trusted
        self.versions: dict[tuple[str, str], int] = {}
        self.drift: dict[str, wire.DriftStatus] = {}
        self.events: list[dict[str, Any]] = []
        self.verdicts: repository.RepositoryStatus | None = None
        self._cond = threading.Condition()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"readme-{secrets.token_hex(4)}",
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        t = self.topics
        filters = [t.all_group_desired(), t.all_device_desired(), t.all_drift()]
        filters += [t.repository_status(), t.event("drift")]
        client.subscribe([(f, 1) for f in filters])

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        topic, payload = message.topic, bytes(message.payload)
        with self._cond:
            if topic == self.topics.repository_status():
                self.verdicts = repository.from_json(payload) if payload else None
            else:
                ref = self.topics.parse(topic)
                if ref.kind == "event":
                    self.events.append(wire.event_from_json(payload))
                elif ref.kind == "device-drift" and payload:
                    self.drift[ref.name] = wire.drift_from_json(payload)
                elif ref.kind in ("group-desired", "device-desired") and payload:
                    kind = ref.kind.split("-")[0]
                    verified = envelopes.verify(
                        payload, self.trusted, payload_type=PAYLOAD_TYPES[kind]
                    )
                    self.versions[(kind, ref.name)] = bundles.decode(verified).version
            self._cond.notify_all()

    def wait(self, why: Callable[[], str | None], timeout: float = WAIT) -> None:
        """Wait until ``why()`` is None (it says what is still missing otherwise)."""
        with self._cond:
            if not self._cond.wait_for(lambda: why() is None, timeout):
                raise AssertionError(f"timed out after {timeout:g}s: {why()}")

    def not_converged(self, branch: str, head: str, devices: list[str]) -> str | None:
        """None once ``head`` is judged and every device is in sync on what is retained."""
        verdict = self.verdicts.branches.get(branch) if self.verdicts else None
        if verdict is None or verdict.head != head:
            return f"the controller has not judged {head[:12]} yet ({verdict})"
        if not verdict.accepted:
            return f"the controller refused {head[:12]}: {verdict.problems}"
        for device in devices:
            status = self.drift.get(device)
            if status is None or status.state != "in_sync":
                return f"{device} is not in sync: {status}"
            wanted = (
                self.versions.get(("group", status.group or "")),
                self.versions.get(("device", device)),
            )
            if (status.applied_version, status.applied_device_version) != wanted:
                return f"{device} is in sync on an older version than retained {wanted}"
        return None

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def writes_under(command: str, roots: dict[str, str]) -> str | None:
    """The device whose root ``command`` writes to (a redirect or a writing tool), if any."""
    parts = words(command)
    targets = [parts[i + 1] for i, w in enumerate(parts[:-1]) if w in (">", ">>")]
    targets += [w.lstrip(">") for w in parts if w.startswith(">") and len(w.lstrip(">")) > 0]
    if parts and parts[0] in WRITERS - {"echo"}:
        targets += parts[1:]
    for target in targets:
        for device, root in roots.items():
            if target.startswith(root.rstrip("/") + "/"):
                return device
    return None


def test_the_readme_walk_through_runs_as_written(tmp_path: Path) -> None:
    todo = steps(README.read_text(encoding="utf-8"))
    assert any(s.background and "setpoint controller" in s.command for s in todo)
    assert sum(1 for s in todo if s.background and "setpoint shim" in s.command) >= 2
    work = tmp_path / "walk"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETPOINT_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        XDG_STATE_HOME=str(tmp_path / "state"),
        GIT_AUTHOR_NAME="Ada",
        GIT_AUTHOR_EMAIL="ada@example.com",
        GIT_COMMITTER_NAME="Ada",
        GIT_COMMITTER_EMAIL="ada@example.com",
        GIT_CONFIG_NOSYSTEM="1",
        NO_COLOR="1",
    )
    running: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []
    port: str | None = None
    fleet: Fleet | None = None
    repo: Path | None = None
    roots: dict[str, str] = {}
    edited: set[str] = set()
    outputs: list[tuple[str, str]] = []

    def git(*args: str) -> str:
        assert repo is not None
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()

    def settle() -> None:
        if fleet is not None and repo is not None and roots:
            branch, current = git("symbolic-ref", "--short", "HEAD"), git("rev-parse", "HEAD")
            seen = fleet
            seen.wait(lambda: seen.not_converged(branch, current, sorted(roots)))

    try:
        for n, step in enumerate(todo):
            command = step.command
            if "PORT" in command:
                assert port is not None, f"PORT used before the broker printed it: {command}"
                command = re.sub(r"\bPORT\b", port, command)
            if step.background:
                log = (tmp_path / f"terminal-{n}.log").open("wb")
                proc = subprocess.Popen(
                    ["bash", "-c", command],
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                running.append((command, proc, log))
                if port is None and "setpoint.mosquitto.broker" in command:
                    port = wait_for_url(tmp_path / f"terminal-{n}.log", proc)
                if "setpoint controller" in command:
                    repo = work / (option(command, "--repo") or ".")
                    key = work / (option(command, "--key") or "")
                    assert port is not None
                    pub = key.with_name("signing.pub").read_bytes()
                    trusted = envelopes.trusted_keys([envelopes.load_public_key(pub)])
                    fleet = Fleet(int(port), option(command, "--prefix") or DEFAULT_PREFIX, trusted)
                if "setpoint shim" in command:
                    roots[option(command, "--device") or ""] = option(command, "--root") or ""
                continue
            settle()
            before = len(fleet.events) if fleet is not None else 0
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            outputs.append((command, done.stdout))
            device = writes_under(command, roots)
            if device is not None and fleet is not None:
                # A hand edit: the drift is seen, and (enforce mode) put back.
                edited.add(device)
                fleet.wait(functools.partial(seen_drift, fleet, device, before))
        settle()
        assert fleet is not None and repo is not None
        statuses = [out for cmd, out in outputs if words(cmd)[:2] == ["setpoint", "status"]]
        assert statuses, "the section never shows `setpoint status`"
        for out in statuses:
            assert re.search(r"fleet: (\d+) devices in \d+ groups, \1 in sync \(100\.0%\)", out)
            assert "every device is in sync" in out and "accepted" in out
        assert len(roots) >= 2 and edited, "the section should make a hand edit on a device"
        git_steps = [words(s.command)[:4] for s in todo if s.command.startswith("git ")]
        assert any("commit" in w for w in git_steps) and any("revert" in w for w in git_steps)
        follow = [i for i, (c, _p, _l) in enumerate(running) if "--follow" in c]
        for device in edited:
            for index in follow:
                log_path = running[index][2].name
                fleet.wait(functools.partial(shown_and_resolved, Path(log_path), device))
    finally:
        if fleet is not None:
            fleet.close()
        stop(running)


def seen_drift(fleet: Fleet, device: str, after: int) -> str | None:
    """None once a drift event after the first ``after`` says ``device`` drifted."""
    for event in fleet.events[after:]:
        if event.get("device") == device and event.get("state") == "drifted":
            return None
    return f"no drift event for {device} after the hand edit yet"


def shown_and_resolved(log: Path, device: str) -> str | None:
    text = log.read_text(encoding="utf-8", errors="replace")
    opened = re.search(rf"opened\s+{re.escape(device)} .*-> drifted", text)
    resolved = re.search(rf"resolved\s+{re.escape(device)} .*drifted -> in_sync", text)
    if opened and resolved:
        return None
    return f"`drift --follow` has not shown {device} drifting and healing:\n{text}"


def wait_for_url(log: Path, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = URL.search(log.read_text(encoding="utf-8", errors="replace"))
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"the broker exited: {log.read_text()}")
        time.sleep(0.05)  # polling a file the broker writes once; not a timing assumption
    raise AssertionError(f"the broker printed no URL in {WAIT:g}s: {log.read_text()}")


def stop(running: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]]) -> None:
    """Ctrl-C to every terminal, newest first; then kill whatever is left (by pid)."""
    left: list[int] = []
    for _command, proc, _log in reversed(running):
        left += descendants(proc.pid)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # e.g. a mosquitto its runner did not stop
    for _command, _proc, log in running:
        log.close()
