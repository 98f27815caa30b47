"""The fleet's transport PKI: a device CA, the broker's server certificate, client
certificates for the controller, the operator and every device, and the CRL the broker
checks.

This is about *who may talk to the broker* (mutual TLS); what a device may *apply* is
decided by the Ed25519 bundle signatures, which do not depend on any of this. Layout of a
PKI directory (mode 0700; every private key 0600)::

    ca.pem ca.key             the fleet's device CA (signs every client and the broker)
    crl.pem                   revoked client certificates (the broker's ``crlfile``)
    broker.pem broker.key     server certificate: CN setpoint-broker, SAN the given hosts
    controller.pem .key       client: CN ``setpoint:controller``
    operator.pem .key         client: CN ``setpoint:operator``
    devices/<id>.pem .key     client: CN = the device id (the broker's ACL username)
    index.json                every certificate issued: serial, identity, expiry, revoked

The controller and operator identities contain ``:``, which the device id grammar
(``^[a-z0-9][a-z0-9._-]{0,63}$``) forbids, so no device certificate can ever be issued
under a name the broker's ACL treats as privileged.

Keys are ECDSA P-256 (every TLS stack on a device speaks it). Built on ``cryptography``;
no ``openssl`` process is ever run. Reads and writes only the PKI directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from setpoint.kit.files import write_atomic
from setpoint.proto.topics import validate_id

from .errors import ConfigError

CONTROLLER_IDENTITY: Final = "setpoint:controller"
OPERATOR_IDENTITY: Final = "setpoint:operator"
BROKER_NAME: Final = "setpoint-broker"
DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1")
CA_DAYS: Final = 3650
LEAF_DAYS: Final = 365
CRL_DAYS: Final = 30
_SKEW: Final = dt.timedelta(minutes=5)


class PkiError(ConfigError):
    """A PKI operation that cannot be done as asked; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Issued:
    """One certificate in ``index.json``."""

    serial: int
    identity: str
    role: str  # "broker", "controller", "operator" or "device"
    not_after: int
    revoked_at: int | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a client needs to connect: the CA, its certificate and its key (paths)."""

    ca: Path
    cert: Path
    key: Path | None  # None when the key was made elsewhere (issued from a CSR)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "setpoint fleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the start (a key is never readable by others)."""
    write_atomic(path, data, mode=mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


class Pki:
    """An existing PKI directory (see the module docstring); :func:`init` makes one."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not (self.root / "ca.pem").is_file() or not (self.root / "ca.key").is_file():
            raise PkiError(f"{self.root} is not a setpoint PKI: run `setpoint pki init {root}`")

    # Paths.
    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def broker(self) -> Credentials:
        return Credentials(self.ca, self.root / "broker.pem", self.root / "broker.key")

    @property
    def controller(self) -> Credentials:
        return Credentials(self.ca, self.root / "controller.pem", self.root / "controller.key")

    @property
    def operator(self) -> Credentials:
        return Credentials(self.ca, self.root / "operator.pem", self.root / "operator.key")

    def device(self, device: str) -> Credentials:
        validate_id(device, "device id")
        key = self.root / "devices" / f"{device}.key"
        return Credentials(
            self.ca, self.root / "devices" / f"{device}.pem", key if key.exists() else None
        )

    # The CA.
    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
        key = serialization.load_pem_private_key((self.root / "ca.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.root / 'ca.key'} is not an EC private key")
        return cert, key

    # The index.
    def records(self) -> list[Issued]:
        path = self.root / "index.json"
        if not path.exists():
            return []
        try:
            return [Issued(**entry) for entry in json.loads(path.read_text("utf-8"))]
        except (ValueError, TypeError) as exc:
            raise PkiError(f"{path} is malformed: {exc}") from exc

    def _save(self, records: Sequence[Issued]) -> None:
        body = json.dumps([asdict(r) for r in records], indent=1, sort_keys=True) + "\n"
        _write(self.root / "index.json", body.encode(), 0o600)

    # Issuing.
    def _sign(
        self,
        identity: str,
        role: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        server_hosts: Sequence[str] = (),
        days: int = LEAF_DAYS,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> x509.Certificate:
        ca_cert, ca_key = self._ca()
        start = not_before or (_now() - _SKEW)
        end = not_after or (start + dt.timedelta(days=days))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(identity))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server_hosts:
            builder = builder.add_extension(_san(server_hosts), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        records = self.records()
        records.append(Issued(cert.serial_number, identity, role, int(end.timestamp())))
        self._save(records)
        return cert

    def _check_free(self, cert_path: Path, identity: str, force: bool) -> None:
        live = any(r.identity == identity and r.revoked_at is None for r in self.records())
        if cert_path.exists() and live and not force:
            raise PkiError(
                f"{cert_path} exists and is live; revoke it first"
                f" (`setpoint pki revoke {identity}`) or pass --force"
            )

    def _issue(
        self,
        cert_path: Path,
        key_path: Path,
        identity: str,
        role: str,
        *,
        force: bool = False,
        **kw: object,
    ) -> Credentials:
        self._check_free(cert_path, identity, force)
        key = _new_key()
        cert = self._sign(identity, role, key.public_key(), **kw)  # type: ignore[arg-type]
        cert_path.parent.mkdir(mode=0o700, exist_ok=True)
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, _cert_pem(cert), 0o644)
        return Credentials(self.ca, cert_path, key_path)

    def issue_device(
        self,
        device: str,
        *,
        csr: bytes | None = None,
        days: int = LEAF_DAYS,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        force: bool = False,
    ) -> Credentials:
        """A client certificate whose CN is ``device`` (validated with the id rule).

        With ``csr`` (PEM), the key stays where the request was made: only the certificate
        is written, and the request's subject is ignored (the CN is always ``device``).
        """
        validate_id(device, "device id")
        creds = self.device(device)
        key_path = self.root / "devices" / f"{device}.key"
        window: dict[str, object] = {
            "days": days,
            "not_before": not_before,
            "not_after": not_after,
        }
        if csr is None:
            return self._issue(creds.cert, key_path, device, "device", force=force, **window)
        self._check_free(creds.cert, device, force)
        try:
            request = x509.load_pem_x509_csr(csr)
        except ValueError as exc:
            raise PkiError(f"not a PEM certificate request: {exc}") from exc
        if not request.is_signature_valid:
            raise PkiError("the certificate request's signature does not verify")
        public = request.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise PkiError("the certificate request must carry an EC (P-256) public key")
        cert = self._sign(device, "device", public, **window)  # type: ignore[arg-type]
        creds.cert.parent.mkdir(mode=0o700, exist_ok=True)
        _write(creds.cert, _cert_pem(cert), 0o644)
        return Credentials(self.ca, creds.cert, None)

    # Revoking.
    def revoke(self, identity: str) -> list[int]:
        """Revoke every live certificate of ``identity``; rewrite the CRL; return serials."""
        now = int(_now().timestamp())
        records, revoked = [], []
        for record in self.records():
            if record.identity == identity and record.revoked_at is None:
                record = Issued(**{**asdict(record), "revoked_at": now})
                revoked.append(record.serial)
            records.append(record)
        if not revoked:
            raise PkiError(f"no live certificate for {identity!r} (see `setpoint pki list`)")
        self._save(records)
        self.write_crl()
        return revoked

    def write_crl(self, days: int = CRL_DAYS) -> Path:
        """Sign the CRL afresh (a broker refuses every client once it passes next update)."""
        ca_cert, ca_key = self._ca()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - _SKEW)
            .next_update(now + dt.timedelta(days=days))
        )
        for record in self.records():
            if record.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(record.serial)
                    .revocation_date(dt.datetime.fromtimestamp(record.revoked_at, dt.UTC))
                    .build()
                )
        crl = builder.sign(ca_key, hashes.SHA256())
        _write(self.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        return self.crl


def init(
    root: Path | str,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    ca_days: int = CA_DAYS,
    days: int = LEAF_DAYS,
) -> Pki:
    """A new PKI in ``root`` (refuses a directory that already holds one)."""
    path = Path(root)
    if (path / "ca.key").exists():
        raise PkiError(f"{path} already holds a PKI (ca.key); refusing to replace the CA")
    if not hosts:
        raise PkiError("the broker certificate needs at least one host name or address")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    key = _new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "setpoint fleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"setpoint device CA {secrets.token_hex(4)}"),
        ]
    )
    start = _now() - _SKEW
    ca = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(path / "ca.key", _key_pem(key), 0o600)
    _write(path / "ca.pem", _cert_pem(ca), 0o644)
    pki = Pki(path)
    pki._save([])
    b = pki.broker
    assert b.key is not None
    pki._issue(b.cert, b.key, BROKER_NAME, "broker", server_hosts=tuple(hosts), days=days)
    for identity, creds, role in (
        (CONTROLLER_IDENTITY, pki.controller, "controller"),
        (OPERATOR_IDENTITY, pki.operator, "operator"),
    ):
        assert creds.key is not None
        pki._issue(creds.cert, creds.key, identity, role, days=days)
    pki.write_crl()
    return pki


def secure_fleet(root: Path | str, devices: Iterable[str] = ()) -> Pki:
    """A ready PKI for a demo or a test: :func:`init` (or reuse), plus one certificate per
    device that does not have one yet."""
    path = Path(root)
    pki = Pki(path) if (path / "ca.key").exists() else init(path)
    for device in devices:
        if not pki.device(device).cert.exists():
            pki.issue_device(device)
    return pki
