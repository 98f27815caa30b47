"""A deliberately broken agent: the Python shim with the group-return bug reintroduced.

SPEC §8 step 9 says an equal version with the same content is "not new" only for the bundle
the device runs. This double treats it as nothing to apply whatever the device runs, the
way the first outside implementation did: a device that leaves a group and comes back waits
for a "new" bundle of that group forever. Run as ``python broken_shim.py SHIM-ARGS...``.
"""

from __future__ import annotations

import sys
from typing import Any

from setpoint.cli import main
from setpoint.device_shim import agent

_fresh = agent.Agent._fresh


def _fresh_against_the_floor(self: Any, kind: Any, name: str, applied: Any, now: float) -> Any:
    held = _fresh(self, kind, name, applied, now)
    if held is not None and held.verdict is not None and not held.verdict.new:
        return None  # the bug: "equal version, same digest: nothing to apply"
    return held


agent.Agent._fresh = _fresh_against_the_floor  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(["shim", *sys.argv[1:]]))
