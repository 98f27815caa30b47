"""Which ring's fleet.yaml gives the rollout rules (pure) and how it is remembered."""

from __future__ import annotations

from pathlib import Path

from setpoint.controller import protection
from setpoint.controller.fleet import FleetSettings
from setpoint.controller.gating import Gate, Ring, Rings


def test_most_protected_is_the_end_of_the_longest_chain() -> None:
    chain = Rings(
        (Ring("main"), Ring("canary", Gate("main")), Ring("production", Gate("canary")),
         Ring("lab", Gate("main")))
    )  # fmt: skip
    assert protection.most_protected(chain) == "production"
    assert protection.most_protected(Rings((Ring("main"),))) is None
    assert protection.most_protected(Rings()) is None


def test_the_choice_is_remembered_and_a_later_main_cannot_move_it(tmp_path: Path) -> None:
    rings = FleetSettings.model_validate(
        {"rings": [{"branch": "main"}, {"branch": "prod", "gate": {"from": "main"}}]}
    )
    memory = protection.Memory(tmp_path, None)
    assert memory.branch(None, "main") is None  # no rings yet: nothing chosen
    assert not memory.path.exists()
    assert memory.branch(rings, "main") == "prod"
    assert memory.branch(FleetSettings(), "main") == "prod"  # main dropped its rings
    assert protection.Memory(tmp_path, "release").branch(rings, "main") == "release"
