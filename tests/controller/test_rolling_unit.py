"""The rollout extension's handling of operator commands, without a broker (pure parts)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from types import SimpleNamespace

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from setpoint.controller.broker import Message
from setpoint.controller.rolling import Emit, Rollouts
from setpoint.proto import approvals, codec, envelopes


def _pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_an_approval_is_credited_to_the_operator_whose_signature_verified(
    tmp_path: Path,
) -> None:
    alice, bob = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    rollouts = Rollouts()
    rollouts._state_dir = tmp_path
    operators = [SimpleNamespace(name=n, key=_pem(k)) for n, k in (("alice", alice), ("bob", bob))]
    rollouts._learn_operators(SimpleNamespace(settings=SimpleNamespace(operators=operators)))  # type: ignore[arg-type]
    now = int(time.time())
    command = approvals.OperatorCommand(
        "approve", secrets.token_hex(8), now, now + 300, ring="production", tree="a" * 40
    )
    envelope = codec.unpack(approvals.sign(command, [alice]), max_size=1 << 20)
    # Signed by alice; a bogus entry naming bob's key comes first.
    envelope["signatures"].insert(0, {"keyid": envelopes.key_id(bob), "sig": b"\1" * 64})
    rollouts.take_command(Message("x/operators/commands", codec.pack(envelope), False))
    approval = rollouts.ledger.approvals["production|" + "a" * 40]
    assert approval["by"] == "alice"
    approved, *_ = [
        a for a in rollouts.actions() if isinstance(a, Emit) and a.fields["action"] == "approved"
    ]
    assert approved.fields["by"] == "alice"
    assert approved.fields["keyid"] == envelopes.key_id(alice)
