"""The fleet most controller tests run: the example of ``setpoint init`` and ``kiosk-02``.

The example has one device per group (so the README's walk-through reaches 100% with two
shims); tests also want two devices in one group, and one that replaces a group resource
for itself.
"""

from __future__ import annotations

from typing import Final

from setpoint.controller import examples

KIOSK_02: Final = """\
group: kiosks
vars:
  site: cafeteria
resources:
  - id: log-level
    kind: setting
    key: log_level
    value: debug
"""
FLEET: Final = {**examples.FILES, "devices/kiosk-02.yaml": KIOSK_02}
