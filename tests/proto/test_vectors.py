"""The committed test vectors: reproducible, true to our code, and verified by openssl."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import setpoint.proto as proto
from setpoint.proto import bundles, codec, commands, envelopes
from setpoint.proto.trust import Floor, TrustState

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "proto" / "vectors"
SCRIPT = ROOT / "scripts" / "make_vectors.py"
DATA: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text())
KEYS: dict[str, Ed25519PublicKey] = {
    k["keyid"]: envelopes.load_public_key((VECTORS / k["public_pem"]).read_bytes())
    for k in DATA["keys"]
}
PUB_FILE = {k["name"]: VECTORS / k["public_pem"] for k in DATA["keys"]}
KEY_FILE = {k["name"]: VECTORS / k["private_pem"] for k in DATA["keys"]}
VALID = {v["name"]: v for v in DATA["valid"]}
SIGNATURES = [(v["name"], s) for v in DATA["valid"] for s in v["signatures"]]


def as_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value


def trust_state(context: dict[str, Any]) -> TrustState:
    floors = {k: Floor(v["version"], v["digest"]) for k, v in context["floors"].items()}
    return TrustState(context["device"], context["group"], floors)


# --- reproducible ---------------------------------------------------------------------------


def test_the_expected_cases_are_there() -> None:
    assert set(VALID) == {
        "group-bundle",
        "device-bundle",
        "reconcile-command",
        "group-bundle-two-keys",
    }
    assert len(VALID["group-bundle-two-keys"]["signatures"]) == 2
    assert {s["name"] for s in DATA["sequences"]} >= {"move-and-back", "pinned-group"}
    assert {c["name"] for c in DATA["invalid_commands"]} >= {"replayed", "expired"}
    names = {v["name"] for v in DATA["invalid"]}
    assert {"tampered-payload", "tampered-payload-type", "tampered-signature", "truncated",
            "no-signatures", "unknown-key", "right-keyid-wrong-key", "wrong-payload-type",
            "oversized", "duplicate-key", "rollback", "expired"} <= names  # fmt: skip


def test_regenerating_gives_identical_files(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in VECTORS.iterdir() if p.name != "__pycache__")
    for name in made:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), (
            f"proto/vectors/{name} is stale: run scripts/make_vectors.py"
        )


def test_the_keys_are_the_documented_seeds() -> None:
    for key in DATA["keys"]:
        seed = hashlib.sha256(key["seed_phrase"].encode()).hexdigest()
        assert key["seed_hex"] == seed
        assert "never for production" in key["seed_phrase"]
        private = envelopes.load_private_key((VECTORS / key["private_pem"]).read_bytes())
        public = private.public_key()
        assert envelopes.raw_public_key(public).hex() == key["public_raw_hex"]
        assert envelopes.key_id(public) == key["keyid"]
        assert hashlib.sha256(bytes.fromhex(key["public_raw_hex"])).hexdigest() == key["keyid"]


# --- true to our code -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_vector_with_our_code(name: str) -> None:
    vector = VALID[name]
    payload = bytes.fromhex(vector["payload_hex"])
    pae = bytes.fromhex(vector["pae_hex"])
    assert pae == envelopes.pae(vector["payloadType"], payload)
    for signature in vector["signatures"]:
        KEYS[signature["keyid"]].verify(bytes.fromhex(signature["sig_hex"]), pae)
    envelope = bytes.fromhex(vector["envelope_hex"])
    check = vector["verify"]
    trusted = {k: KEYS[k] for k in check["trusted"]}
    verified = envelopes.verify(
        envelope, trusted, payload_type=check["payloadType"], threshold=check["threshold"]
    )
    assert verified == payload
    decoded = envelopes.decode(envelope)
    assert [s.sig.hex() for s in decoded.signatures] == [s["sig_hex"] for s in vector["signatures"]]
    assert as_json(codec.unpack(payload, max_size=len(payload))) == vector["decoded"]


@pytest.mark.parametrize("name", ["group-bundle", "device-bundle", "group-bundle-two-keys"])
def test_bundle_vectors_are_accepted_by_trust_state(name: str) -> None:
    vector = VALID[name]
    kind = vector["decoded"]["kind"]
    check = vector["verify"]
    verdict = trust_state(vector["trust"]).evaluate(
        kind,
        bytes.fromhex(vector["envelope_hex"]),
        trusted={k: KEYS[k] for k in check["trusted"]},
        threshold=check["threshold"],
        now=vector["trust"]["now"],
    )
    assert verdict.new
    assert verdict.digest == vector["content_digest"]
    digests = {r.id: bundles.resource_digest(r) for r in verdict.bundle.resources}
    assert digests == vector["resource_digests"]


def test_command_vector_decodes() -> None:
    payload = bytes.fromhex(VALID["reconcile-command"]["payload_hex"])
    command = commands.decode(payload)
    assert command.device == "kiosk-01" and command.action == "reconcile"


def test_effective_vector() -> None:
    [vector] = DATA["effective"]
    group = bundles.decode(bytes.fromhex(VALID[vector["group"]]["payload_hex"]))
    device = bundles.decode(bytes.fromhex(VALID[vector["device"]]["payload_hex"]))
    merged = [
        {**as_json(bundles.resource_to_map(r)), "resource_digest": bundles.resource_digest(r)}
        for r in bundles.effective(group, device)
    ]
    assert merged == vector["resources"]
    # The vector does exercise the merge and the substitution.
    motd = next(r for r in vector["resources"] if r["id"] == "motd")
    assert bytes.fromhex(motd["content"]) == b"Welcome to the lobby kiosk.\n"
    assert [r["id"] for r in vector["resources"]] == ["motd", "tz", "ntp", "screens"]


@pytest.mark.parametrize("vector", DATA["invalid"], ids=lambda v: v["name"])
def test_invalid_vector_is_refused_with_its_error(vector: dict[str, Any]) -> None:
    expected = getattr(proto, vector["expected_error"])
    check = vector["verify"]
    trusted = {k: KEYS[k] for k in check["trusted"]}
    data = bytes.fromhex(vector["envelope_hex"])
    kind = {
        envelopes.GROUP_BUNDLE_TYPE: "group",
        envelopes.DEVICE_BUNDLE_TYPE: "device",
    }[check["payloadType"]]
    with pytest.raises(proto.ProtocolError) as info:
        trust_state(vector["trust"]).evaluate(
            kind,
            data,
            trusted=trusted,
            threshold=check["threshold"],
            max_size=check["max_size"],
            now=vector["trust"]["now"],
        )
    assert type(info.value) is expected, f"{type(info.value).__name__}: {info.value}"
    if vector["stage"] == "envelope":
        with pytest.raises(expected):
            envelopes.verify(
                data,
                trusted,
                payload_type=check["payloadType"],
                threshold=check["threshold"],
                max_size=check["max_size"],
            )


# --- verified by openssl ----------------------------------------------------------------------


def openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    binary = shutil.which("openssl")
    assert binary, "the vectors are checked with the openssl command: apt-get install -y openssl"
    return subprocess.run([binary, *args], capture_output=True, timeout=30, check=False)


def openssl_verify(
    pub: Path, pae: bytes, sig: bytes, tmp_path: Path
) -> subprocess.CompletedProcess[bytes]:
    (tmp_path / "pae.bin").write_bytes(pae)
    (tmp_path / "sig.bin").write_bytes(sig)
    return openssl(
        "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin",
        "-in", str(tmp_path / "pae.bin"), "-sigfile", str(tmp_path / "sig.bin"),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "signature"), SIGNATURES, ids=[f"{n}-{s['key']}" for n, s in SIGNATURES]
)
def test_openssl_verifies_the_signature(
    name: str, signature: dict[str, str], tmp_path: Path
) -> None:
    pae = bytes.fromhex(VALID[name]["pae_hex"])
    sig = bytes.fromhex(signature["sig_hex"])
    result = openssl_verify(PUB_FILE[signature["key"]], pae, sig, tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert b"Signature Verified Successfully" in result.stdout


@pytest.mark.parametrize(
    ("name", "signature"), SIGNATURES[:1], ids=[f"{n}-{s['key']}" for n, s in SIGNATURES[:1]]
)
def test_openssl_refuses_a_tampered_pae(
    name: str, signature: dict[str, str], tmp_path: Path
) -> None:
    pae = bytearray.fromhex(VALID[name]["pae_hex"])
    pae[-1] ^= 0x01
    sig = bytes.fromhex(signature["sig_hex"])
    result = openssl_verify(PUB_FILE[signature["key"]], bytes(pae), sig, tmp_path)
    assert result.returncode != 0
    assert b"Signature Verified Successfully" not in result.stdout


def test_openssl_refuses_the_other_key(tmp_path: Path) -> None:
    vector = VALID["group-bundle"]
    sig = bytes.fromhex(vector["signatures"][0]["sig_hex"])
    result = openssl_verify(PUB_FILE["test-key-2"], bytes.fromhex(vector["pae_hex"]), sig, tmp_path)
    assert result.returncode != 0


def test_openssl_signs_the_same_bytes(tmp_path: Path) -> None:
    # Ed25519 is deterministic: OpenSSL's signature over the PAE is ours, byte for byte.
    vector = VALID["reconcile-command"]
    (tmp_path / "pae.bin").write_bytes(bytes.fromhex(vector["pae_hex"]))
    result = openssl(
        "pkeyutl", "-sign", "-inkey", str(KEY_FILE["test-key"]), "-rawin",
        "-in", str(tmp_path / "pae.bin"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.hex() == vector["signatures"][0]["sig_hex"]


@pytest.mark.parametrize("key", DATA["keys"], ids=lambda k: k["name"])
def test_openssl_reads_the_same_keys(key: dict[str, str]) -> None:
    derived = openssl("pkey", "-in", str(VECTORS / key["private_pem"]), "-pubout")
    assert derived.returncode == 0, derived.stderr.decode()
    assert derived.stdout == (VECTORS / key["public_pem"]).read_bytes()
    der = openssl("pkey", "-pubin", "-in", str(VECTORS / key["public_pem"]), "-outform", "DER")
    assert der.returncode == 0, der.stderr.decode()
    # SPKI DER for Ed25519 is a fixed 12-byte header, then the 32-byte raw key.
    assert der.stdout[:12] == bytes.fromhex("302a300506032b6570032100")
    assert hashlib.sha256(der.stdout[12:]).hexdigest() == key["keyid"]


# --- the vectors for what outside implementers had to guess ------------------------------------


def untyped(value: dict[str, Any]) -> Any:
    [(tag, raw)] = value.items()
    return float(raw) if tag == "float" else raw


@pytest.mark.parametrize("case", [c for c in DATA["codec"] if "canonical_hex" in c],
                         ids=lambda c: c["name"])  # fmt: skip
def test_codec_vector_reencodes_canonically(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["input_hex"])
    value = codec.unpack(data, max_size=len(data))
    assert codec.pack(value).hex() == case["canonical_hex"]
    assert codec.digest(value) == case["digest"]


def test_codec_vectors_keep_what_libraries_lose() -> None:
    cases = {c["name"]: c for c in DATA["codec"]}
    assert cases["float-one"]["canonical_hex"] == "cb3ff0000000000000"
    assert cases["float32-one"]["canonical_hex"] == cases["float-one"]["canonical_hex"]
    assert cases["int-one"]["digest"] != cases["float-one"]["digest"]
    assert cases["bom-kept"]["canonical_hex"].startswith("a8efbbbf")
    keys = list(codec.unpack(bytes.fromhex(cases["key-order"]["canonical_hex"]), max_size=999))
    assert keys == ["Z", "a", "aa", "b", "é", "\uff61", "\U0001f600"]
    # UTF-16 code-unit order would differ: that is the trap the vector is for.
    assert sorted(keys, key=lambda k: k.encode("utf-16-be")) != keys


@pytest.mark.parametrize("case", [c for c in DATA["codec"] if "expected_error" in c],
                         ids=lambda c: c["name"])  # fmt: skip
def test_codec_vector_is_refused(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["input_hex"])
    with pytest.raises(proto.DecodeError) as info:
        codec.unpack(data, max_size=1024)
    assert proto.refusal_reason(info.value) == case["reason"] == "malformed"


def test_substitution_vectors() -> None:
    text, binary = DATA["substitution"]
    variables = {k: untyped(v) for k, v in text["vars"].items()}
    assert isinstance(variables["one"], float)
    for case in text["cases"]:
        resource = bundles.FileResource("f", "f", case["text"].encode(), 0o644)
        rendered = bundles.render(resource, variables)
        assert isinstance(rendered, bundles.FileResource)
        assert rendered.content.decode() == case["result"], case
    results = {c["text"]: c["result"] for c in text["cases"]}
    assert results["$${site}"] == "$lobby"  # no escape (SPEC 6.3)
    assert results["${half} ${one} ${tiny} ${small} ${limit}"] == "0.5 1.0 1e-07 1e-05 0.0001"
    [case] = binary["cases"]
    assert case["result_hex"] == case["content_hex"]


def test_settings_file_vectors() -> None:
    written, read = DATA["settings_file"]
    values = {k: untyped(v) for k, v in written["values"].items()}
    text = bytes.fromhex(written["file_hex"]).decode("ascii")
    assert json.loads(text) == values
    assert isinstance(json.loads(text)["screen.ratio"], float)
    for key, value in values.items():
        assert codec.digest({"key": key, "value": value}) == written["digests"][key]
    digests = set()
    for case in read["cases"]:
        value = json.loads(case["file_text"])[case["key"]]
        assert type(value) is type(untyped(case["value"])) and value == untyped(case["value"])
        assert codec.digest({"key": case["key"], "value": value}) == case["digest"]
        digests.add(case["digest"])
    assert len(digests) == 4  # 1, 1.0 (= 1e0), 10**16, "1": int and float stay apart


@pytest.mark.parametrize("case", DATA["report"], ids=lambda c: c["name"])
def test_report_vector(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["report_hex"])
    report = proto.reports.decode(data)
    assert proto.reports.encode(report) == data  # canonical, nothing lost
    assert as_json(codec.unpack(data, max_size=len(data))) == case["decoded"]
    group = VALID[case["applied"]["group"]]
    device = VALID[case["applied"]["device"]]
    assert report.applied_group is not None and report.applied_device is not None
    assert report.applied_group.digest == group["content_digest"]
    assert report.applied_device.digest == device["content_digest"]
    assert report.seq > 2**32
    for refusal in report.refusals:
        assert isinstance(refusal.version, int) and isinstance(refusal.target, str)


@pytest.mark.parametrize("vector", DATA["invalid"], ids=lambda v: v["name"])
def test_invalid_vector_names_its_topic_and_word(vector: dict[str, Any]) -> None:
    kind = {
        envelopes.GROUP_BUNDLE_TYPE: "group",
        envelopes.DEVICE_BUNDLE_TYPE: "device",
    }[vector["verify"]["payloadType"]]
    assert vector["topic"].split("/")[0] == {"group": "groups", "device": "devices"}[kind]
    expected = getattr(proto, vector["expected_error"])
    assert vector["reason"] == proto.refusal_reason(expected("x"))
    refusal = vector["refusal"]
    assert refusal["kind"] == kind and refusal["reason"] == vector["reason"]
    assert isinstance(refusal["target"], str) and isinstance(refusal["version"], int)


@pytest.mark.parametrize("vector", DATA["invalid_commands"], ids=lambda v: v["name"])
def test_invalid_command_vector(vector: dict[str, Any]) -> None:
    # SPEC 6.5, in its order: type and signatures, payload, device, expiry, sequence.
    state = vector["state"]
    data = bytes.fromhex(vector["envelope_hex"])
    with pytest.raises(proto.ProtocolError) as info:
        payload = envelopes.verify(
            data, {k: KEYS[k] for k in vector["trusted"]}, payload_type=envelopes.COMMAND_TYPE
        )
        command = commands.decode(payload)
        if command.device != state["device"]:
            raise proto.WrongTargetError(command.device)
        if state["now"] > command.expires_at + 300:
            raise proto.ExpiredError(str(command.expires_at))
        if command.seq <= state["last_seq"]:
            raise proto.RollbackError(str(command.seq))
    assert type(info.value).__name__ == vector["expected_error"]
    assert proto.refusal_reason(info.value) == vector["reason"] == vector["refusal"]["reason"]


@pytest.mark.parametrize("case", DATA["shards"]["cases"], ids=lambda c: c["device"])
def test_shard_vector(case: dict[str, Any]) -> None:
    device = case["device"]
    assert hashlib.sha256(device.encode("ascii")).hexdigest() == case["sha256_hex"]
    assert case["shard"] == case["sha256_hex"][0] == proto.shard_of(device)
    topics = proto.Topics()
    assert topics.device_reported(device) == f"{topics.prefix}/{case['reported']}"
    assert topics.device_presence(device) == f"{topics.prefix}/{case['presence']}"
    assert case["reported"] == f"shards/{case['shard']}/devices/{device}/reported"
    other = next(s for s in DATA["shards"]["shards"] if s != case["shard"])
    with pytest.raises(proto.WrongShardError):
        topics.parse(f"{topics.prefix}/shards/{other}/devices/{device}/reported")


def test_shard_vectors_cover_many_shards() -> None:
    assert DATA["shards"]["shards"] == list("0123456789abcdef")
    assert len({c["shard"] for c in DATA["shards"]["cases"]}) >= 4
