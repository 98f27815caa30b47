"""``setpoint demo rollout``: rings and gated rollouts, end to end, on a private broker.

A private mosquitto from ``mosquitto/``, a scratch fleet repository with three rings
(``main`` → ``canary`` → ``production``), a signing key, the controller and one shim per
device, every one a real process running the real CLI. The story, with timings:

1. bootstrap: every ring gets v1, each ring after the one before proved it;
2. a change merged to ``main`` converges on qualification;
3. promoted to ``canary`` (``setpoint promote``, which checks the gate), it rolls out in
   batches; merged to ``production`` early (``setpoint promote`` refuses; a plain merge),
   production waits ``gated`` and goes out by itself once canary passed;
4. a change that fails on canary halts after its first batch, and the controller reverts
   it with its own commit; canary walks back, production stays gated.

Cleans up every process it started; exits 0, or 1 if a step did not happen in time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .demo import (
    DemoFailed,
    Narrator,
    run_cli,
    setpoint_cmd,
    start_controller,
    start_shim,
    tell_failure,
    workspace,
)

QA, CANARY, PROD = "qa-1", ("can-1", "can-2", "can-3"), "prod-1"
DEVICES = (QA, *CANARY, PROD)
HEALTHY_FOR = 2
PAUSE = 1
AUTHOR = b"Demo Operator <ops@example.com>"

FLEET = f"""\
# Changes go main (qualification) -> canary -> production, by merges.
rings:
  - branch: main
  - branch: canary
    gate: {{from: main, in_sync: 100%, healthy_for: 0}}
  - branch: production
    gate: {{from: canary, in_sync: 100%, healthy_for: {HEALTHY_FOR}s}}
"""


def group_file(branch: str, banner: bool, extra: str = "") -> str:
    text = f"branch: {branch}\n{extra}resources:\n"
    text += "  - {id: motd, kind: file, path: etc/motd, source: files/motd}\n"
    if banner:
        text += "  - {id: banner, kind: file, path: etc/issue, source: files/issue}\n"
    return text


def fleet_files(motd: str, banner: bool = False) -> dict[str, str]:
    canaries = (
        f"rollout: {{batch: 1, pause: {PAUSE}s, order: [can-1, can-2, can-3],"
        " on_failure: revert}\n"
    )
    files = {
        "fleet.yaml": FLEET,
        "files/motd": f"{motd}\n",
        "groups/qa.yaml": group_file("main", banner),
        "groups/canaries.yaml": group_file("canary", banner, canaries),
        "groups/prod.yaml": group_file("production", banner),
        "devices/qa-1.yaml": "group: qa\n",
        "devices/prod-1.yaml": "group: prod\n",
    }
    for device in CANARY:
        files[f"devices/{device}.yaml"] = "group: canaries\n"
    if banner:
        files["files/issue"] = "Authorised use only.\n"
    return files


# --- Git, as an operator does it ----------------------------------------------------------


class Fleet:
    """The scratch fleet repository: ``main`` checked out, other rings moved by merges."""

    def __init__(self, path: Path) -> None:
        from dulwich.repo import Repo

        self.path = path
        path.mkdir(parents=True)
        repo = Repo.init(str(path))
        repo.refs.set_symbolic_ref(b"HEAD", b"refs/heads/main")
        repo.close()

    def commit(self, files: dict[str, str], message: str) -> str:
        """Write ``files`` on ``main`` and commit them."""
        from dulwich import porcelain

        for name, text in files.items():
            (self.path / name).parent.mkdir(parents=True, exist_ok=True)
            (self.path / name).write_text(text)
        porcelain.add(str(self.path), paths=[str(self.path / n) for n in files])
        sha = porcelain.commit(
            str(self.path), message=message.encode(), author=AUTHOR, committer=AUTHOR
        )
        return sha.decode()

    def head(self, branch: str) -> str:
        from dulwich.repo import Repo

        with Repo(str(self.path)) as repo:
            return repo.refs[b"refs/heads/" + branch.encode()].decode()

    def tree(self, branch: str) -> str:
        from dulwich.objects import Commit
        from dulwich.repo import Repo

        with Repo(str(self.path)) as repo:
            commit = repo[repo.refs[b"refs/heads/" + branch.encode()]]
            assert isinstance(commit, Commit)
            return commit.tree.decode()

    def branch(self, name: str) -> None:
        from dulwich.repo import Repo

        with Repo(str(self.path)) as repo:
            repo.refs[b"refs/heads/" + name.encode()] = repo.refs[b"refs/heads/main"]

    def merge(self, source: str, target: str, message: str) -> str:
        """``git merge --no-ff source`` on ``target`` (rings only move forward by merges, so
        the merge takes the source's content)."""
        from dulwich.objects import Commit
        from dulwich.repo import Repo

        with Repo(str(self.path)) as repo:
            refs = {b: b"refs/heads/" + b.encode() for b in (source, target)}
            heads = {b: repo.refs[r] for b, r in refs.items()}
            src = repo[heads[source]]
            assert isinstance(src, Commit)
            merge = Commit()
            merge.tree = src.tree
            merge.parents = [heads[target], heads[source]]
            merge.author = merge.committer = AUTHOR
            merge.author_time = merge.commit_time = int(time.time())
            merge.author_timezone = merge.commit_timezone = 0
            merge.message = message.encode() + b"\n"
            repo.object_store.add_object(merge)
            repo.refs.set_if_equals(refs[target], heads[target], merge.id)
            return merge.id.decode()

    def log(self, branch: str, count: int = 3) -> list[str]:
        from dulwich.objects import Commit
        from dulwich.repo import Repo

        lines = []
        with Repo(str(self.path)) as repo:
            sha = repo.refs[b"refs/heads/" + branch.encode()]
            for _ in range(count):
                commit = repo[sha]
                assert isinstance(commit, Commit)
                author = commit.author.decode().split(" <")[0]
                subject = commit.message.decode().splitlines()[0]
                lines.append(f"{sha.decode()[:12]} {author}: {subject}")
                if not commit.parents:
                    break
                sha = commit.parents[0]
        return lines


# --- What any operator tool sees on the broker ----------------------------------------------


class Watcher:
    """Drift statuses, events, and the retained rollout and gate statuses."""

    def __init__(self, host: str, port: int, prefix: str, narrator: Narrator) -> None:
        import paho.mqtt.client as mqtt

        from setpoint.proto import rollout_status, status, topics

        self._status = status
        self._rollout_status = rollout_status
        self.topics = topics.Topics(prefix)
        self.narrator = narrator
        self.drift: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.groups: dict[str, dict[str, Any]] = {}
        self.gates: dict[str, dict[str, Any]] = {}
        self.mark = time.monotonic()
        self.cond = threading.Condition()
        self.client: Any = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"setpoint-demo-rollout-{os.getpid()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(
            [
                (self.topics.all_drift(), 1),
                (self.topics.all_events(), 1),
                (self.topics.all_group_rollout(), 1),
                (self.topics.all_ring_gates(), 1),
            ]
        )

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if not message.payload:
            return
        try:
            topic = message.topic
            with self.cond:
                ref = self.topics.parse(topic)
                if ref.kind == "group-rollout":
                    codecs = self._rollout_status
                    group = codecs.rollout_from_json(message.payload)
                    self.groups[group.group] = codecs.rollout_to_dict(group)
                elif ref.kind == "ring-gate":
                    codecs = self._rollout_status
                    gate = codecs.gate_from_json(message.payload)
                    self.gates[gate.ring] = codecs.gate_to_dict(gate)
                else:
                    if ref.kind == "device-drift":
                        self.drift[ref.name] = self._status.drift_from_json(message.payload)
                    elif ref.kind == "event":
                        event = self._status.event_from_json(message.payload)
                        event["_seen"] = time.monotonic()
                        self.events.append(event)
                        self._tell(event)
                self.cond.notify_all()
        except Exception as exc:  # a demo watcher must not die on one odd message
            self.narrator.warn(f"ignored a message on {message.topic}: {exc}")

    def _tell(self, event: dict[str, Any]) -> None:
        kind, action = event.get("type"), event.get("action")
        if kind == "gated":
            self.narrator.say(
                f"event gated: ring {event['ring']} {event['state']}: {event['reason']}"
            )
        elif kind == "rollout-halted":
            self.narrator.warn(f"event rollout-halted: {event['group']}: {event['reason']}")
        elif kind == "rollout" and action in ("batch-released", "batch-completed"):
            devices = event.get("devices") or event.get("in_sync") or []
            self.narrator.say(
                f"event rollout/{action}: {event['group']} v{event['version']} batch"
                f" {event['batch']}/{event['of']} {', '.join(devices)}"
            )
        elif kind == "rollout" and action in ("gate-passed", "gate-opened"):
            self.narrator.say(f"event rollout/{action}: ring {event['ring']}")
        elif kind == "rollout" and action in ("started", "completed", "reverted", "walk-back"):
            extra = f" commit {event['revert'][:12]}" if action == "reverted" else ""
            self.narrator.say(f"event rollout/{action}: {event.get('group')}{extra}")

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float) -> float:
        start = time.monotonic()
        with self.cond:
            if not self.cond.wait_for(predicate, timeout=timeout):
                raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        return time.monotonic() - start

    def of(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("action") == action or e.get("type") == action]

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


# --- The story -----------------------------------------------------------------------------


def run_rollout(args: argparse.Namespace) -> int:
    from setpoint.commands._common import require_controller

    require_controller("dulwich")
    if getattr(args, "secure", False):
        print("setpoint demo rollout: --secure is for the loop scenario only", file=sys.stderr)
        return 2
    narrator = Narrator(sys.stdout.isatty() and not args.no_color)
    with ExitStack() as stack:
        work = workspace(stack, args.keep)
        try:
            timings = story(stack, work, narrator, args.timeout)
        except DemoFailed as exc:
            tell_failure(narrator, exc, work, keep=bool(args.keep))
            return 1
    narrator.step("Timings")
    for what, seconds in timings.items():
        print(f"  {seconds:6.2f}s  {what}", flush=True)
    return 0


def story(stack: ExitStack, work: Path, narrator: Narrator, timeout: float) -> dict[str, float]:
    from setpoint.mosquitto import Broker

    timings: dict[str, float] = {}
    (work / "logs").mkdir()

    narrator.step("A private mosquitto, a signing key and a fleet with three rings")
    broker = stack.enter_context(Broker())
    narrator.say(f"mosquitto listening on {broker.url} (config from mosquitto/)")
    run_cli("keys", "generate", "--out", str(work / "keys"))
    fleet = Fleet(work / "fleet")
    fleet.commit(fleet_files("v1"), "A fleet in three rings")
    fleet.branch("canary")
    fleet.branch("production")
    narrator.say(f"fleet repository {fleet.path}: branches main, canary, production")
    for line in FLEET.splitlines()[1:]:
        narrator.say(f"  fleet.yaml | {line}")
    narrator.say(
        f"devices: {QA} (main), {', '.join(CANARY)} (canary: batches of 1, {PAUSE}s pause),"
        f" {PROD} (production)"
    )

    narrator.step("Controller and one shim per device")
    watcher = Watcher(broker.host, broker.port, "setpoint/v1", narrator)
    stack.callback(watcher.close)
    start_controller(stack, work, fleet.path, broker.url, "--grace", "30", "--tick", "0.2")
    roots = {device: start_shim(stack, work, device, broker.url) for device in DEVICES}
    # An old image left a directory where a later change wants a file: can-1 will fail it.
    (roots["can-1"] / "etc" / "issue").mkdir(parents=True)
    narrator.say(f"started the controller and {len(DEVICES)} shims")

    def runs(devices: tuple[str, ...] | list[str], motd: str) -> Callable[[], bool]:
        def check() -> bool:
            for device in devices:
                drift = watcher.drift.get(device)
                if drift is None or drift.state != "in_sync":
                    return False
                path = roots[device] / "etc" / "motd"
                if not path.exists() or path.read_text() != f"{motd}\n":
                    return False
            return True

        return check

    def passed(ring: str, branch: str) -> Callable[[], bool]:
        tree = fleet.tree(branch)
        return lambda: tree in watcher.gates.get(ring, {}).get("passed", [])

    took = watcher.wait(runs(DEVICES, "v1"), "v1 on every ring", timeout)
    narrator.good(
        f"bootstrap: v1 on every ring in {took:.2f}s (each ring after the last proved it)"
    )
    timings["bootstrap: v1 on all three rings"] = took

    narrator.step("A change merged to main converges on qualification")
    t0 = time.monotonic()
    sha = fleet.commit({"files/motd": "v2\n"}, "motd v2")
    narrator.say(f"committed {sha[:12]} to main (files/motd: v2)")
    took = watcher.wait(runs([QA], "v2"), f"{QA} on v2", timeout)
    narrator.good(f"{QA} in_sync on v2 {took:.2f}s after the commit")
    timings["main: commit -> qualification in sync"] = took
    if not runs(CANARY, "v1")() or not runs([PROD], "v1")():
        raise DemoFailed("v2 reached a ring it was not promoted to")
    watcher.wait(passed("canary", "main"), "v2 to pass the canary gate", timeout)
    narrator.say(f"content {fleet.tree('main')[:12]} passed the canary gate (ran on main)")

    narrator.step("Promoted to canary: it rolls out in batches; production merged early waits")
    out = run_cli("promote", "main", "canary", "--repo", str(fleet.path), "--broker", broker.url)
    t0 = time.monotonic()  # the merge is the promote command's last step
    narrator.say(f"setpoint promote main canary: {out.strip()}")
    refused = subprocess.run(
        setpoint_cmd("promote", "canary", "production", "--repo", str(fleet.path),
                     "--broker", broker.url),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if refused.returncode != 1:
        raise DemoFailed(f"promote canary production should refuse: {refused.stdout}")
    narrator.say(f"setpoint promote canary production: {refused.stdout.strip()}")
    fleet.merge("canary", "production", "Merge canary into production (early)")
    t_prod = time.monotonic()
    narrator.say("merged canary into production with git anyway, while canary rolls")
    tree = fleet.tree("production")
    watcher.wait(
        lambda: (
            watcher.groups.get("prod", {}).get("state") == "gated"
            and watcher.gates.get("production", {}).get("tree") == tree
        ),
        "production to be gated",
        timeout,
    )
    timings["production (early merge) -> gated"] = time.monotonic() - t_prod
    narrator.good(f"production gated: {watcher.groups['prod']['reason']}")
    watcher.wait(
        lambda: any(e.get("group") == "canaries" for e in watcher.of("completed")),
        "the canary rollout to complete",
        timeout + len(CANARY) * PAUSE,
    )
    watcher.wait(runs(CANARY, "v2"), "v2 on every canary", timeout)
    for event in watcher.of("batch-completed"):
        if event["group"] == "canaries" and event["version"] == watcher.of("started")[0]["version"]:
            label = f"canary: promote -> batch {event['batch']}/{event['of']} in sync"
            timings[label] = event["_seen"] - t0
    narrator.good(f"canary: v2 on every device, batch by batch, {time.monotonic() - t0:.2f}s")
    if not runs([PROD], "v1")():
        raise DemoFailed("production left v1 before canary passed")
    watcher.wait(runs([PROD], "v2"), "production to go out by itself", timeout + HEALTHY_FOR)
    took = time.monotonic() - t_prod
    narrator.good(
        f"production went out by itself once canary passed ({HEALTHY_FOR}s healthy):"
        f" {PROD} in_sync on v2 {took:.2f}s after the early merge"
    )
    timings["production: early merge -> in sync (gate opened by itself)"] = took

    narrator.step("A change that fails on canary: halted, and reverted by the controller")
    t0 = time.monotonic()
    sha = fleet.commit(
        {**fleet_files("v3", banner=True)}, "motd v3 and a login banner in etc/issue"
    )
    narrator.say(f"committed {sha[:12]} to main (v3, a new file etc/issue)")
    watcher.wait(runs([QA], "v3"), f"{QA} on v3", timeout)
    narrator.good(f"{QA} in_sync on v3 {time.monotonic() - t0:.2f}s after the commit")
    watcher.wait(passed("canary", "main"), "v3 to pass the canary gate", timeout)
    t0 = time.monotonic()
    bad = fleet.merge("main", "canary", "Promote main to canary (v3)")
    narrator.say(f"promoted main to canary (git merge): {bad[:12]}")
    fleet.merge("canary", "production", "Merge canary into production (early, v3)")
    narrator.say("and merged canary into production early again")
    watcher.wait(lambda: bool(watcher.of("rollout-halted")), "the halt", timeout)
    halted = watcher.of("rollout-halted")[0]
    took = time.monotonic() - t0
    failed = ", ".join(f"{d['device']} ({d['reason']})" for d in halted["devices"])
    narrator.good(f"halted {took:.2f}s after the promotion, after batch 1: {failed}")
    timings["canary (failing change): promote -> halted after batch 1"] = took
    watcher.wait(lambda: bool(watcher.of("reverted")), "the controller's revert", timeout)
    revert = watcher.of("reverted")[0]["revert"]
    timings["canary: promote -> revert commit written"] = time.monotonic() - t0
    narrator.good(f"the controller committed {revert[:12]} to canary:")
    for line in fleet.log("canary", 2):
        narrator.say(f"  git log canary | {line}")
    watcher.wait(lambda: bool(watcher.of("walk-back")), "canary to walk back", timeout)
    watcher.wait(runs(CANARY, "v2"), "canary to walk back to v2", timeout)
    took = time.monotonic() - t0
    narrator.good(
        f"canary walked back: every device in_sync on v2, {took:.2f}s after the promotion"
    )
    timings["canary: promote -> walked back, all in sync on v2"] = took
    tree = fleet.tree("production")
    watcher.wait(
        lambda: (
            watcher.groups.get("prod", {}).get("state") == "gated"
            and watcher.gates.get("production", {}).get("tree") == tree
        ),
        "production to stay gated",
        timeout,
    )
    if not runs([PROD], "v2")():
        raise DemoFailed(f"production should still run v2: {watcher.drift.get(PROD)}")
    narrator.good(f"production stays gated on v3 and runs v2: {watcher.groups['prod']['reason']}")
    if len(watcher.of("rollout-halted")) != 1 or len(watcher.of("reverted")) != 1:
        raise DemoFailed("the halt and the revert should happen once")

    narrator.step(f"The operator's view: setpoint rollout status --broker {broker.url}")
    print(run_cli("rollout", "status", "--broker", broker.url).rstrip(), flush=True)
    narrator.step("Done")
    watcher.close()
    narrator.say("stopping every process the demo started")
    return timings
