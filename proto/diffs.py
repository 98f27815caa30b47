"""Desired against reported, per resource, for one device: what ``setpoint diff`` prints and
the dashboard's device page shows.

:func:`device_diff` takes the retained payloads (the device bundle, the group bundles, the
device's report), decodes them (verifying signatures when trusted keys are given), merges
the bundles exactly as the device does (:func:`bundles.effective`) and returns one row per
resource. Secret setting values never leave this module: :func:`describe` shows them as
``<secret>``.

Pure; no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from . import bundles, envelopes, reports
from .bundles import Bundle, BundleKind, CommandResource, FileResource, Resource
from .errors import InvalidId
from .topics import Topics
from .trust import PAYLOAD_TYPES

SECRET: Final = "<secret>"
# A reported status that is a verdict by itself, whatever the digests say.
_STATUS_VERDICTS: Final = ("drifted", "failed", "blocked", "skipped", "pending")


class Unavailable(Exception):
    """The diff cannot be made: a bundle is not retained, or the report is someone else's.
    The message says which."""


@dataclass(frozen=True, slots=True)
class DeviceDiff:
    """The device's desired bundles, its report and the rows comparing them."""

    device: str
    group: str
    group_bundle: Bundle
    device_bundle: Bundle
    report: reports.Report | None
    rows: list[dict[str, Any]]
    verified: bool

    @property
    def differs(self) -> bool:
        return self.report is None or any(r["verdict"] != "same" for r in self.rows)


def decode_bundle(
    payload: bytes | None, kind: BundleKind, trusted: Mapping[str, Any] | None
) -> Bundle | None:
    """A retained bundle, verified when ``trusted`` keys are given (else decoded as is)."""
    if not payload:
        return None
    if trusted is not None:
        data = envelopes.verify(payload, trusted, payload_type=PAYLOAD_TYPES[kind])
    else:
        data = envelopes.decode(payload).payload
    return bundles.decode(data)


def describe(resource: Resource) -> str:
    """What is desired, in a line for people; a secret setting's value is ``<secret>``, a
    sealed file's content is only said to be sealed."""
    if isinstance(resource, FileResource):
        size = f"{len(resource.content)} bytes" if resource.sealed is None else "sealed"
        return f"{resource.path} {resource.mode:04o} ({size})"
    if isinstance(resource, CommandResource):
        return f"check: {resource.check}"
    value = SECRET if resource.secret else json.dumps(resource.value)
    return f"{resource.key} = {value}"


def compare(desired: list[Resource], report: reports.Report | None) -> list[dict[str, Any]]:
    """One row per resource, desired ones first, then those only the device reports."""
    seen = {r.id: r for r in report.resources} if report is not None else {}
    rows: list[dict[str, Any]] = []
    for resource in desired:
        digest = bundles.resource_digest(resource)
        got = seen.get(resource.id)
        if got is None:
            verdict = "not reported"
        elif got.status in _STATUS_VERDICTS:
            verdict = got.status
        elif got.kind != "command" and got.digest and got.digest != digest:
            verdict = "differs"
        else:
            verdict = "same"
        rows.append(
            {
                "id": resource.id,
                "kind": resource.kind,
                "desired": describe(resource),
                "desired_digest": digest,
                "reported_status": got.status if got else None,
                "reported_digest": got.digest if got else None,
                "detail": got.detail if got else "",
                "verdict": verdict,
            }
        )
    wanted = {r.id for r in desired}
    for rid, got in sorted(seen.items()):
        if rid not in wanted:
            rows.append(
                {
                    "id": rid,
                    "kind": got.kind,
                    "desired": None,
                    "desired_digest": None,
                    "reported_status": got.status,
                    "reported_digest": got.digest,
                    "detail": got.detail,
                    "verdict": "not desired",
                }
            )
    return rows


def device_diff(
    device: str,
    device_payload: bytes | None,
    group_payloads: Mapping[str, bytes],
    report_payload: bytes | None,
    trusted: Mapping[str, Any] | None = None,
) -> DeviceDiff:
    """Compare what is desired for ``device`` with what it reports.

    ``group_payloads`` maps group ids to their retained bundles. Raises :class:`Unavailable`
    when a bundle is missing or the report names another device, and ProtocolError when a
    payload is bad or its signature does not verify.
    """
    device_bundle = decode_bundle(device_payload, "device", trusted)
    if device_bundle is None:
        raise Unavailable(f"no bundle is retained for device {device!r} (is it in the fleet?)")
    group = device_bundle.group or ""
    group_bundle = decode_bundle(group_payloads.get(group), "group", trusted)
    report = reports.decode(report_payload) if report_payload else None
    if group_bundle is None:
        raise Unavailable(f"no bundle is retained for group {group!r}")
    if report is not None and report.device != device:
        raise Unavailable(f"the report on {device}'s topic claims to be from {report.device!r}")
    rows = compare(bundles.effective(group_bundle, device_bundle), report)
    return DeviceDiff(
        device, group, group_bundle, device_bundle, report, rows, verified=trusted is not None
    )


def topics_for(device: str, topics: Topics) -> list[str]:
    """The retained topics a diff of ``device`` reads (its bundle, its report, every group's
    bundle: the device bundle names the group)."""
    return [
        topics.device_desired(device),
        topics.device_reported(device),
        topics.all_group_desired(),
    ]


def from_retained(
    device: str,
    messages: Mapping[str, bytes],
    topics: Topics,
    trusted: Mapping[str, Any] | None = None,
) -> DeviceDiff:
    """:func:`device_diff` over the retained messages (topic to payload) read from
    :func:`topics_for`; the same errors."""
    groups = {}
    for topic, payload in messages.items():
        try:
            ref = topics.parse(topic)
        except InvalidId:
            continue
        if ref.kind == "group-desired":
            groups[ref.name] = payload
    return device_diff(
        device,
        messages.get(topics.device_desired(device)),
        groups,
        messages.get(topics.device_reported(device)),
        trusted,
    )
