"""setpoint's controller: git commits in, signed retained bundles out; reports in, drift out.

Layers, bottom up: :mod:`safeyaml` and :mod:`fleet` (validating the repository's files),
:mod:`repository` and :mod:`trees` (reading commits with dulwich), :mod:`rendering`
(fleet -> bundles, pure), :mod:`planning` (what to publish, pure), :mod:`state` and
:mod:`audit` (the state directory), :mod:`broker` and :mod:`retained` (MQTT),
:mod:`watching` and :mod:`webhooks` (noticing commits), :mod:`service` (the
:class:`Controller` that runs it all), :mod:`detecting` (drift, pure).

Needs the ``setpoint[controller]`` extra.
"""

from .broker import Backoff, BrokerSettings, Link
from .errors import (
    BrokerUnavailable,
    ConfigError,
    ControllerError,
    FleetError,
    Problem,
    RepositoryUnavailable,
)
from .rendering import Render, Rendered, Target
from .service import Controller, ControllerConfig, Publication

__all__ = [
    "Backoff",
    "BrokerSettings",
    "BrokerUnavailable",
    "ConfigError",
    "Controller",
    "ControllerConfig",
    "ControllerError",
    "FleetError",
    "Link",
    "Problem",
    "Publication",
    "Render",
    "Rendered",
    "RepositoryUnavailable",
    "Target",
]
