"""The messages the kit sends, signed as the controller would sign them (or deliberately not).

Everything here is pure: bundles and commands are built from the device id, a base version
and the clock, then signed with the key the agent under test trusts (or a fresh key it does
not). Versions start at the kit's start time in milliseconds and sequence numbers at the
start time in microseconds, so each run is above every earlier run's floors and both go
past 2^32 (an agent must keep them in 64-bit integers, SPEC §14).

Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from setpoint.proto import bundles, commands, envelopes, trust
from setpoint.proto.bundles import Bundle, FileResource, Resource, SettingResource, SettingValue
from setpoint.proto.commands import Command

GROUP_A: Final = "conformance-a"
GROUP_B: Final = "conformance-b"
OTHER_DEVICE: Final = "conformance-other"
COMMIT: Final = "c0nf0rmance"
LIFETIME: Final = 3600
# The file resource a hand edit (--edit-cmd) changes, relative to the device root.
EDIT_PATH: Final = "conformance/a.txt"
EDIT_ID: Final = "a-file"


def group_a_resources(revision: int) -> tuple[Resource, ...]:
    return (
        FileResource(
            EDIT_ID,
            EDIT_PATH,
            f"group a, revision {revision}, site ${{site}}, cost $$5, ${{unknown}}\n".encode(),
            0o640,
        ),
        # A whole float: it must stay a float in the settings file (1.0 is not 1).
        SettingResource("a-ratio", "conformance.ratio", 1.0),
        SettingResource("a-count", "conformance.count", 3 + revision),
        SettingResource("a-site", "conformance.site", "${site}/${tiny}"),
    )


def group_b_resources() -> tuple[Resource, ...]:
    return (FileResource("b-file", "conformance/b.txt", b"group b\n", 0o644),)


@dataclass(frozen=True, slots=True)
class Messages:
    """Builds and signs the kit's bundles and commands for one device."""

    key: Ed25519PrivateKey
    device: str
    now: int
    vars: Mapping[str, SettingValue] = field(
        default_factory=lambda: {"site": "lab", "tiny": 1e-07, "whole": 2.0}
    )

    @property
    def base_version(self) -> int:
        return self.now * 1000

    @property
    def base_seq(self) -> int:
        return self.now * 1_000_000

    def group_a(self, version: int, *, revision: int = 0) -> Bundle:
        return self._bundle("group", GROUP_A, version, group_a_resources(revision))

    def group_b(self, version: int) -> Bundle:
        return self._bundle("group", GROUP_B, version, group_b_resources())

    def device_bundle(
        self, version: int, group: str, *, pin: int | None = None, target: str | None = None
    ) -> Bundle:
        resources = (
            FileResource(
                "d-file",
                "conformance/device.txt",
                b"${site} ${whole} ${tiny} ${missing} $site\n",
                0o600,
            ),
        )
        return replace(
            self._bundle("device", target or self.device, version, resources),
            group=group,
            vars=dict(self.vars),
            group_version=pin,
        )

    def _bundle(
        self, kind: bundles.BundleKind, target: str, version: int, resources: tuple[Resource, ...]
    ) -> Bundle:
        return Bundle(kind, target, version, COMMIT, self.now, self.now + LIFETIME, resources)

    def expired(self, bundle: Bundle) -> Bundle:
        return replace(bundle, issued_at=self.now - 2 * 86400, expires_at=self.now - 86400)

    def sign(
        self,
        bundle: Bundle,
        *,
        key: Ed25519PrivateKey | None = None,
        payload_type: str | None = None,
    ) -> bytes:
        return envelopes.sign(
            payload_type or trust.PAYLOAD_TYPES[bundle.kind],
            bundles.encode(bundle),
            [key or self.key],
        )

    def command(
        self,
        seq: int,
        *,
        device: str | None = None,
        expired: bool = False,
        key: Ed25519PrivateKey | None = None,
    ) -> bytes:
        issued = self.now - 7200 if expired else self.now
        command = Command(
            device or self.device, "reconcile", seq, issued, issued + 300, "conformance kit"
        )
        return commands.sign(command, [key or self.key])
