"""A fleet repository for simulated devices: groups and one file per ``sim-NNNNN`` device.

:func:`create` writes and commits (with the git CLI) a repository whose devices are the
ids ``setpoint sim`` uses, spread over ``groups`` groups (the first in ``enforce`` mode,
the others alternating ``observe``/``enforce``); :func:`bump` commits a change to one group
(a new value for its ``motd`` file), which is what the convergence benchmark times.
Used by the benchmarks, the simulator's tests and demos; not by the controller.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from .running import device_id

AUTHOR = ("setpoint sim", "sim@localhost")


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": AUTHOR[0],
        "GIT_AUTHOR_EMAIL": AUTHOR[1],
        "GIT_COMMITTER_NAME": AUTHOR[0],
        "GIT_COMMITTER_EMAIL": AUTHOR[1],
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(repo),
    }
    result = subprocess.run(
        ["git", "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {repo}: {result.stderr.strip()}")
    return result.stdout.strip()


def group_name(index: int) -> str:
    return f"sim-g{index}"


def group_yaml(index: int, revision: int, rollout: str | None = None) -> str:
    mode = "enforce" if index % 2 == 0 else "observe"
    batches = "" if rollout is None else f"rollout: {rollout}\n"
    return f"""\
mode: {mode}
{batches}\
resources:
  - id: motd
    kind: file
    path: etc/motd
    mode: "0644"
    content: |
      ${{site}}: revision {revision}
  - id: log-level
    kind: setting
    key: log_level
    value: info
  - id: interval
    kind: setting
    key: report_interval_s
    value: 30
"""


def create(
    path: Path, devices: int, *, groups: int = 1, first: int = 0, rollout: str | None = None
) -> str:
    """A git repository at ``path`` listing ``devices`` simulated devices; the commit id.
    ``rollout`` (YAML flow text, e.g. ``"{batch: 10%, pause: 0s}"``) makes every group roll
    out its new versions batch by batch (docs/rollouts.md)."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    (path / "fleet.yaml").write_text("description: simulated fleet\n", encoding="utf-8")
    (path / "groups").mkdir(exist_ok=True)
    (path / "devices").mkdir(exist_ok=True)
    for g in range(groups):
        (path / "groups" / f"{group_name(g)}.yaml").write_text(
            group_yaml(g, 1, rollout), encoding="utf-8"
        )
    for i in range(first, first + devices):
        name = device_id(i)
        text = f"group: {group_name(i % groups)}\nvars:\n  site: {name}\n"
        (path / "devices" / f"{name}.yaml").write_text(text, encoding="utf-8")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", f"simulated fleet: {devices} devices")
    return git(path, "rev-parse", "HEAD")


def bump(path: Path, group: int = 0, revision: int = 2) -> str:
    """Commit a change to one group's ``motd`` (the rest of its file stays); return the
    commit id."""
    target = path / "groups" / f"{group_name(group)}.yaml"
    text = target.read_text(encoding="utf-8")
    target.write_text(re.sub(r": revision \d+$", f": revision {revision}", text, flags=re.M))
    git(path, "commit", "-q", "-am", f"{group_name(group)}: revision {revision}")
    return git(path, "rev-parse", "HEAD")
