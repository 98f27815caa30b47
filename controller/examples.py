"""The example fleet that ``setpoint init`` commits: two groups, two devices, every kind.

* ``kiosks`` (enforce): a file with inline content using a var, a file from
  ``files/kiosk/config.ini`` in the repository, a setting;
* ``gateways`` (observe): a setting and a command (check/apply);
* ``kiosk-01`` (in ``kiosks``), ``gw-01`` (in ``gateways``).

One device per group, so the README's walk-through (one shim per device) brings the whole
fleet to 100% in sync. A command runs only where the device's own policy allows it: the
README starts ``gw-01``'s shim with a policy file that allows commands; a device without
one reports the command ``blocked`` (``device policy forbids commands``), not drift.

:data:`SEALED` names one sealed secret per group, for the demo to seal once its devices
have identities.

Writes files into a directory and commits them with dulwich.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from dulwich import porcelain
from dulwich.repo import Repo

AUTHOR: Final = b"setpoint init <setpoint@localhost>"
DEFAULT_BRANCH: Final = "main"

FILES: Final[dict[str, str]] = {
    "fleet.yaml": """\
# Fleet-wide settings. Groups live in groups/, devices in devices/.
# Check your changes with `setpoint validate .` before committing.
description: Example fleet created by `setpoint init`
# How long a signed bundle stays valid; the controller re-signs it at half-life.
bundle_ttl: 7d
# A commit that removes every group and device is refused unless this is true.
allow_empty: false
""",
    "groups/kiosks.yaml": """\
# Kiosks: setpoint puts back anything that drifts (mode: enforce).
mode: enforce
resources:
  - id: motd
    kind: file
    path: etc/motd
    mode: "0644"
    content: |
      Welcome to the ${site} kiosk.
  - id: kiosk-config
    kind: file
    path: etc/kiosk/config.ini
    mode: "0640"
    source: files/kiosk/config.ini
  - id: log-level
    kind: setting
    key: log_level
    value: info
""",
    "groups/gateways.yaml": """\
# Gateways: setpoint reports drift but changes nothing (mode: observe).
mode: observe
resources:
  - id: uplink-interval
    kind: setting
    key: uplink_interval_s
    value: 30
  - id: ready-marker
    kind: command
    # Runs with the device root as the working directory, only where the device's own
    # policy file allows commands (allow_commands = true); elsewhere it is 'blocked'.
    check: test -f var/lib/gateway/ready
    apply: mkdir -p var/lib/gateway && touch var/lib/gateway/ready
    timeout: 30
""",
    "devices/kiosk-01.yaml": """\
group: kiosks
vars:
  site: lobby
# A device can replace a resource of its group, by id, for itself only:
# resources:
#   - id: log-level
#     kind: setting
#     key: log_level
#     value: debug
""",
    "devices/gw-01.yaml": """\
group: gateways
vars:
  site: roof
""",
    "files/kiosk/config.ini": """\
[kiosk]
fullscreen = true
idle_timeout_s = 120
""",
}


# One sealed secret per group (docs/secrets.md). Sealing needs each device's recipient,
# which only exists once the device made its identity (`setpoint shim keygen`), so `init`
# cannot commit them; the demo seals these once its devices have identities. Group -> the
# resource `setpoint secrets seal --write` adds (a file is 0600; a setting is secret).
SEALED: Final[dict[str, dict[str, str]]] = {
    "kiosks": {"resource": "kiosk-api-key", "path": "etc/kiosk/api.key"},
    "gateways": {"resource": "uplink-token", "key": "uplink_token"},
}


def write(directory: Path, files: dict[str, str] = FILES) -> None:
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def create(directory: Path) -> str:
    """A new repository at ``directory`` with the example fleet committed on ``main``.

    Returns the commit id. ``directory`` must not exist or be empty.
    """
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    repo: Any = Repo.init(str(directory))
    try:
        repo.refs.set_symbolic_ref(b"HEAD", b"refs/heads/" + DEFAULT_BRANCH.encode())
        write(directory)
        # dulwich's ``add`` reads paths relative to the repository, whatever the working
        # directory is: give it repository-relative names, so `setpoint init fleet/` from
        # anywhere commits the files it wrote.
        porcelain.add(repo, paths=sorted(FILES))
        commit = porcelain.commit(
            repo,
            message=b"Example fleet (setpoint init)\n",
            author=AUTHOR,
            committer=AUTHOR,
        )
    finally:
        repo.close()
    return commit.decode("ascii")
