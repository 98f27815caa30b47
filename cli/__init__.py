"""setpoint: GitOps for device fleets over MQTT.

The distribution's top package. The wire protocol is :mod:`setpoint.proto`, the central
service :mod:`setpoint.controller`, the device agent :mod:`setpoint.device_shim`; the
``setpoint`` command (:mod:`setpoint.cli`) sits above them and imports a side only when
one of its verbs runs.
"""

__version__ = "0.1.0"
