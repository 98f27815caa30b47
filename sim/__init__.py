"""The fleet simulator: thousands of simulated devices that behave like shims on the wire.

``setpoint sim`` runs it; the benchmarks in ``bench/`` and ``make demo DEVICES=N`` use it.
Each device has its own MQTT connection (:mod:`.mqtt`, on :mod:`setpoint.transport`), verifies
bundles for real with ``setpoint.proto``, applies them to memory and reports in the
shim's format (:mod:`.devices`); :mod:`.running` paces the connections and spreads a large
fleet over several processes.

Not used by the controller or the shim: a test and demo tool.
"""

from . import devices, mqtt, running
from .devices import Faults, Fleet, SimDevice, Verifier
from .running import SimConfig, Swarm, device_id

__all__ = [
    "Faults",
    "Fleet",
    "SimConfig",
    "SimDevice",
    "Swarm",
    "Verifier",
    "device_id",
    "devices",
    "mqtt",
    "running",
]
