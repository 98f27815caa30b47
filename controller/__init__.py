"""setpoint's controller: git commits in, signed retained bundles out; reports in, drift out.

Layers, bottom up: :mod:`safeyaml` and :mod:`fleet` (validating the repository's files),
:mod:`repository` and :mod:`trees` (reading commits with dulwich), :mod:`rendering`
(fleet -> bundles, pure), :mod:`planning` (what to publish, pure), :mod:`state` and
:mod:`audit` (the state directory), :mod:`broker` and :mod:`retained` (MQTT),
:mod:`watching` and :mod:`webhooks` (noticing commits), :mod:`service` (the
:class:`Controller` that runs it all), :mod:`detecting` (drift, pure).

Needs the ``setpoint[controller]`` extra.
"""

import importlib
from typing import Any

# Nothing is imported eagerly: importing a pure module (``setpoint.controller.planning``)
# runs this file first, and must not load MQTT, git or asyncio with it.
_WHERE = {
    "Backoff": "broker",
    "BrokerSettings": "broker",
    "Link": "broker",
    "BrokerUnavailable": "errors",
    "ConfigError": "errors",
    "ControllerError": "errors",
    "FleetError": "errors",
    "Problem": "errors",
    "RepositoryUnavailable": "errors",
    "Render": "rendering",
    "Rendered": "rendering",
    "Target": "rendering",
    "Controller": "service",
    "ControllerConfig": "service",
    "Publication": "service",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
