"""The read-only web dashboard: the fleet, its devices, rollouts and events, live.

``setpoint dashboard --listen 127.0.0.1:8080 --broker ...`` runs it. It subscribes to the
retained operator topics and the events with the operator's identity and publishes nothing
but its own barrier messages; pages are server-rendered (Jinja2, autoescaped), updated live
with server-sent events, and work with JavaScript off. See ``docs/dashboard.md``.

Depends on ``setpoint.proto`` and the ``dashboard`` extra (aiohttp, Jinja2, aiomqtt), never
on the controller or the shim.
"""

from . import access, fleet, serving, watching
from .access import AccessError
from .serving import Dashboard, Settings, serve
from .watching import BrokerSettings

__all__ = [
    "AccessError",
    "BrokerSettings",
    "Dashboard",
    "Settings",
    "access",
    "fleet",
    "serve",
    "serving",
    "watching",
]
