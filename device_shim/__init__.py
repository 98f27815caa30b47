"""setpoint's device shim: verify signed bundles, apply them idempotently, report, heal.

It runs on small Linux devices with paho-mqtt, msgpack and cryptography alone (and
inotify-simple, to notice hand edits at once), and imports nothing from the controller.
The layers, bottom up:

* :mod:`.planning` (pure): ``plan(desired, observed) -> steps``, a closed set of steps;
* :mod:`.observing`: what is on the device (stat first, hash only when needed);
* :mod:`.watching`: which managed paths changed, told by inotify (polling where it cannot);
* :mod:`.applying`: one executor per step kind, all or nothing, journaled;
* :mod:`.state`: what survives a restart (trust floors, applied bundles, what it manages);
* :mod:`.reporting`: the report and when to send it; :mod:`.backoff`: retry timing;
* :mod:`.link`: the MQTT connection; :mod:`.agent`: the loop that owns all the I/O.

Errors are in :mod:`.errors` (tree in its docstring).

Rotating the fleet's signing key without bricking devices
----------------------------------------------------------
A device accepts a bundle only with valid signatures by ``--threshold`` of the keys given
with ``--trust`` (each ``--trust`` file is one PEM public key; give several). To rotate:

1. **Add the new key to every device first**: restart each shim with both
   ``--trust old.pub --trust new.pub`` (threshold 1). Nothing changes yet: bundles are
   still signed by the old key only, and it is still trusted.
2. **Sign with both keys** on the controller. Devices that trust either key accept; any
   device the first step missed still works. Wait until every device reports the new
   versions (``setpoint status``).
3. **Retire the old key**: restart the shims with ``--trust new.pub`` only, then stop
   signing with the old key. A device that never got the new key refuses the bundles
   and says so in its report (``refusals``, reason ``signature``): fix it, do not skip it.

Version floors survive a rotation, so old bundles stay refused. If *every* key the device
trusted before is replaced at once (recovery from a compromised key), the shim resets its
floors at start, as TUF does on a root rotation: floors only guard against replays of
bundles signed by keys the device no longer trusts, and a compromised key may have pushed
them absurdly high. ``setpoint shim --reset-floors`` does the same on purpose.
"""

from setpoint.kit.brokers import BrokerSettings

from .agent import Agent
from .backoff import Backoff, RetryGate
from .config import DevicePolicy, ShimConfig, load_policy, load_trusted_keys
from .errors import (
    ApplyError,
    ConfigError,
    PermanentApplyError,
    ShimError,
    StateError,
    TemporaryApplyError,
)
from .planning import Observed, Step, plan
from .reporting import SHIM_VERSION

__all__ = [
    "SHIM_VERSION",
    "Agent",
    "ApplyError",
    "Backoff",
    "BrokerSettings",
    "ConfigError",
    "DevicePolicy",
    "Observed",
    "PermanentApplyError",
    "RetryGate",
    "ShimConfig",
    "ShimError",
    "StateError",
    "Step",
    "TemporaryApplyError",
    "load_policy",
    "load_trusted_keys",
    "plan",
]
