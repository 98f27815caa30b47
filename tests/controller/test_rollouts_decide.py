"""The rollouts' decision as a pure function: facts in, (new state, decision) out."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from setpoint.controller import fleet, rendering, rollouts
from setpoint.controller.commits import CommitInfo
from setpoint.controller.planning import Current
from setpoint.controller.rendering import Render, Target, View
from setpoint.controller.rollouts import Emit, Facts, Record, State
from setpoint.controller.trees import DirectoryTree
from setpoint.proto import approvals
from setpoint.proto.status import DriftStatus

GATED = """\
rings:
  - branch: main
  - branch: production
    gate: {from: main, in_sync: 100%, healthy_for: 0}
"""
MAIN_TREE, PROD_TREE = "a" * 40, "b" * 40


def _group(branch: str, motd: str, extra: str = "") -> str:
    return (
        f"branch: {branch}\n{extra}resources:\n"
        f"  - id: motd\n    kind: file\n    path: etc/motd\n    content: {motd!r}\n"
    )


@pytest.fixture
def view(tmp_path: Path) -> Callable[..., View]:
    counter = iter(range(1000))

    def make(files: dict[str, str], branch: str, tree: str) -> View:
        root = tmp_path / f"v{next(counter)}"
        for name, text in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        info = CommitInfo(f"{next(counter):040x}", "Alice <a@example.com>", 0, "msg", tree.encode())
        return View(branch, info, fleet.load(DirectoryTree(root)))

    return make


def _ringed(view: Callable[..., View], prod_motd: str, **extra: str) -> Render:
    files = {
        "fleet.yaml": GATED,
        "groups/qa.yaml": _group("main", "v1"),
        "groups/prod.yaml": _group("production", prod_motd),
        "devices/qa-1.yaml": "group: qa\n",
        "devices/prod-1.yaml": "group: prod\n",
        **extra,
    }
    main = view(files, "main", MAIN_TREE)
    production = view(files, "production", PROD_TREE)
    return rendering.render("main", {"main": main, "production": production})


def _facts(render: Render, published: dict[Target, Current] | None = None, **kw: object) -> Facts:
    return Facts(
        render=render,
        published=published if published is not None else {},
        statuses=kw.pop("statuses", {}),  # type: ignore[arg-type]
        synced=bool(kw.pop("synced", True)),
        now=float(kw.pop("now", 1_000_000.0)),  # type: ignore[arg-type]
    )


def test_without_rings_windows_or_rollouts_nothing_is_decided(
    view: Callable[..., View],
) -> None:
    files = {"groups/qa.yaml": _group("main", "v1"), "devices/qa-1.yaml": "group: qa\n"}
    render = rendering.render("main", {"main": view(files, "main", MAIN_TREE)})
    state = State()
    new, decision = rollouts.decide(state, _facts(render))
    assert new is state
    assert decision.render is render and not decision.active and decision.actions == ()


def test_content_that_never_ran_on_the_source_ring_is_held_and_said_once(
    view: Callable[..., View], monkeypatch: pytest.MonkeyPatch
) -> None:
    render = _ringed(view, "v2")  # production's tree never ran on main
    state = State()
    facts = _facts(render)
    before_render, before_state = copy.deepcopy(render.desired), copy.deepcopy(state)

    def no_clock() -> float:
        raise AssertionError("the decision read the clock")

    monkeypatch.setattr(time, "time", no_clock)
    new, decision = rollouts.decide(state, facts)
    monkeypatch.undo()

    held = {Target("group", "prod"), Target("device", "prod-1")}
    assert held <= decision.render.broken and not held & set(decision.render.desired)
    assert Target("group", "qa") in decision.render.desired
    gated = [a for a in decision.actions if isinstance(a, Emit) and a.type == "gated"]
    assert [g.fields["state"] for g in gated] == ["refused"]
    assert any(isinstance(a, Record) and a.reason == "gate-refused" for a in decision.actions)
    topics = facts.topics
    assert decision.views[topics.ring_gate("production")]["state"] == "refused"
    assert decision.views[topics.group_rollout("prod")]["state"] == "refused"
    # Nothing it was given changed; the new state is a new value.
    assert render.desired == before_render and state == before_state
    assert new is not state and new.ledger.trees  # it learned the heads' trees
    # The same facts with the new state: the same holding back, no second event.
    again, decision2 = rollouts.decide(new, facts)
    assert decision2.render.broken == decision.render.broken
    assert not [a for a in decision2.actions if isinstance(a, Emit)]
    assert again == new


def test_content_that_ran_healthy_on_the_source_ring_passes_the_gate(
    view: Callable[..., View],
) -> None:
    # production gets main's content: both branches have main's tree.
    render = rendering.render(
        "main",
        {
            "main": view(dict(_files_v1()), "main", MAIN_TREE),
            "production": view(dict(_files_v1()), "production", MAIN_TREE),
        },
    )
    published = {
        t: Current(r.bundle, r.author, r.branch)
        for t, r in render.desired.items()
        if t.id in ("qa", "qa-1")
    }
    qa_version = published[Target("group", "qa")].version
    statuses = {
        "qa-1": DriftStatus(
            device="qa-1",
            group="qa",
            state="in_sync",
            desired_version=qa_version,
            applied_version=qa_version,
            commit=None,
            since=0.0,
        )
    }
    state, decision = rollouts.decide(State(), _facts(render, published, statuses=statuses))
    assert Target("group", "prod") in decision.render.desired
    events = [a.fields.get("action") for a in decision.actions if isinstance(a, Emit)]
    assert "gate-passed" in events and "gate-opened" in events
    assert state.ledger.evidence[f"production|{MAIN_TREE}"].passed_at == 1_000_000.0


def _files_v1() -> dict[str, str]:
    return {
        "fleet.yaml": GATED,
        "groups/qa.yaml": _group("main", "v1"),
        "groups/prod.yaml": _group("production", "v1"),
        "devices/qa-1.yaml": "group: qa\n",
        "devices/prod-1.yaml": "group: prod\n",
    }


def _approve(nonce: str, now: int) -> approvals.OperatorCommand:
    return approvals.OperatorCommand(
        "approve", nonce, now, now + 300, ring="production", tree="c" * 40
    )


def test_an_operator_command_is_decided_without_changing_the_state_given() -> None:
    state = State()
    new, actions = rollouts.decide_command(state, _approve("n1", 1000), "alice", "k1", 1000.0)
    assert state.ledger.approvals == {} and state.ledger.nonces == []
    assert new.ledger.approvals[f"production|{'c' * 40}"]["by"] == "alice"
    assert [a.fields["action"] for a in actions if isinstance(a, Emit)] == ["approved"]
    replayed, actions = rollouts.decide_command(new, _approve("n1", 1000), "alice", "k1", 1000.0)
    assert replayed is new
    assert [a.fields["reason"] for a in actions if isinstance(a, Emit)] == ["replayed"]
    late, actions = rollouts.decide_command(new, _approve("n2", 1000), "alice", "k1", 5000.0)
    assert late is new
    assert [a.fields["reason"] for a in actions if isinstance(a, Emit)] == ["expired"]
