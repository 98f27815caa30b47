"""The fleet PKI (`setpoint pki`): what it issues, key permissions, and each bad input."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from setpoint.cli import main
from setpoint.controller import pki as pki_mod
from setpoint.proto.errors import InvalidId


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(c: x509.Certificate) -> str:
    return str(c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_init_makes_ca_broker_controller_operator(tmp_path: Path) -> None:
    pki = pki_mod.init(tmp_path / "pki")
    ca = cert(pki.ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    broker = cert(pki.broker.cert)
    sans = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = broker.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cn(cert(pki.controller.cert)) == pki_mod.CONTROLLER_IDENTITY
    assert cn(cert(pki.operator.cert)) == pki_mod.OPERATOR_IDENTITY
    for c in (broker, cert(pki.controller.cert), cert(pki.operator.cert)):
        c.verify_directly_issued_by(ca)
    assert x509.load_pem_x509_crl(pki.crl.read_bytes()).is_signature_valid(ca.public_key())  # type: ignore[arg-type]


def test_private_keys_are_0600_and_the_directory_0700(tmp_path: Path) -> None:
    pki = pki_mod.init(tmp_path / "pki")
    pki.issue_device("dev1")
    keys = list(pki.root.rglob("*.key"))
    assert len(keys) == 5
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(pki.root.stat().st_mode) == 0o700


def test_issue_device_cn_is_the_device_id(tmp_path: Path) -> None:
    pki = pki_mod.init(tmp_path / "pki")
    creds = pki.issue_device("kiosk-01")
    c = cert(creds.cert)
    assert cn(c) == "kiosk-01"
    c.verify_directly_issued_by(cert(pki.ca))
    eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize(
    "device",
    ["dev/1", "dev+", "#", "Dev1", "", "a" * 65, "setpoint:controller", "dev 1", "dev\x001"],
)
def test_issue_refuses_a_hostile_device_id(tmp_path: Path, device: str) -> None:
    pki = pki_mod.init(tmp_path / "pki")
    with pytest.raises(InvalidId):
        pki.issue_device(device)
    assert not list((tmp_path / "pki").glob("devices/*"))


def test_issue_from_a_csr_keeps_the_key_on_the_device(tmp_path: Path) -> None:
    pki = pki_mod.init(tmp_path / "pki")
    device_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")]))
        .sign(device_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    creds = pki.issue_device("dev1", csr=csr)
    assert creds.key is None and not (pki.root / "devices" / "dev1.key").exists()
    c = cert(creds.cert)
    assert cn(c) == "dev1"  # the request's own subject is ignored
    assert c.public_key() == device_key.public_key()


def test_issue_refuses_a_bad_csr(tmp_path: Path) -> None:
    pki = pki_mod.init(tmp_path / "pki")
    with pytest.raises(pki_mod.PkiError, match="not a PEM certificate request"):
        pki.issue_device("dev1", csr=b"garbage")
    ed = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev1")]))
        .sign(ed, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(pki_mod.PkiError, match="EC"):
        pki.issue_device("dev1", csr=csr)


def test_issue_twice_is_refused_until_revoked(tmp_path: Path) -> None:
    pki = pki_mod.init(tmp_path / "pki")
    first = cert(pki.issue_device("dev1").cert)
    with pytest.raises(pki_mod.PkiError, match="revoke it first"):
        pki.issue_device("dev1")
    assert pki.revoke("dev1") == [first.serial_number]
    second = cert(pki.issue_device("dev1").cert)
    assert second.serial_number != first.serial_number
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(first.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(second.serial_number) is None


def test_revoke_unknown_identity(tmp_path: Path) -> None:
    pki = pki_mod.init(tmp_path / "pki")
    with pytest.raises(pki_mod.PkiError, match="no live certificate"):
        pki.revoke("nobody")


def test_init_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    pki_mod.init(tmp_path / "pki")
    before = (tmp_path / "pki" / "ca.key").read_bytes()
    with pytest.raises(pki_mod.PkiError, match="already holds a PKI"):
        pki_mod.init(tmp_path / "pki")
    assert (tmp_path / "pki" / "ca.key").read_bytes() == before


def test_not_a_pki_directory(tmp_path: Path) -> None:
    with pytest.raises(pki_mod.PkiError, match="setpoint pki init"):
        pki_mod.Pki(tmp_path)


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert main(["pki", "init", d, "--host", "broker.example", "--host", "10.0.0.5"]) == 0
    assert main(["pki", "issue", "dev1", "--pki", d]) == 0
    assert main(["pki", "issue", "Bad/Id", "--pki", d]) == 2
    assert "is not valid" in capsys.readouterr().err
    assert main(["pki", "issue", "dev1", "--pki", d]) == 2
    assert main(["pki", "revoke", "dev1", "--pki", d]) == 0
    assert main(["pki", "crl", "--pki", d, "--days", "7"]) == 0
    assert main(["pki", "list", "--pki", d, "--json"]) == 0
    out = capsys.readouterr().out
    assert '"revoked_at": null' in out and '"identity": "dev1"' in out
    assert main(["pki", "issue", "dev2", "--pki", str(tmp_path / "nope")]) == 2
    assert "setpoint pki init" in capsys.readouterr().err
    assert main(["pki", "crl", "--pki", d, "--days", "0"]) == 2
    sans = cert(Path(d) / "broker.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "broker.example" in sans.value.get_values_for_type(x509.DNSName)
