"""The conformance kit: plays the controller's side against a running device agent.

``setpoint conformance`` publishes signed bundles and commands (valid and invalid) over
MQTT to one device and checks its reports and presence against ``proto/SPEC.md``, one
line per requirement. It needs only the broker, the device id and the signing key the
agent trusts; it never reads the device's files except through the hooks it is given.

Imports ``proto`` and paho-mqtt only: never the controller or the shim (the kit must judge
any agent, including ours, from the outside).
"""

from __future__ import annotations

from .outcomes import Outcome, passed, summary, to_json
from .running import Options, run
from .wire import Broker, KitError

__all__ = ["Broker", "KitError", "Options", "Outcome", "passed", "run", "summary", "to_json"]
