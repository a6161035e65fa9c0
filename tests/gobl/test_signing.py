"""Tests for ES256 envelope signing and the JWK key file."""

from __future__ import annotations

import base64
import json
import re
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from worker.errors import DigestMismatch
from worker.gobl.c14n import canonical_json
from worker.gobl.envelope import verify_digest
from worker.gobl.signing import (
    DEFAULT_KEY_FILE_NAME,
    SignatureInvalid,
    SigningKey,
    load_or_create_key,
    sign_envelope,
    verify_signature,
)


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def flip_first_character(part: str) -> str:
    # Every bit of the first base64url character is significant, so the bytes change.
    return ("B" if part[0] == "A" else "A") + part[1:]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def signed(envelope: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    result: dict[str, Any] = sign_envelope(envelope, key)
    return result


@pytest.fixture
def token(signed: dict[str, Any]) -> str:
    value: str = signed["sigs"][-1]
    return value


def test_sign_appends_one_token(envelope: dict[str, Any], signed: dict[str, Any]) -> None:
    assert len(signed["sigs"]) == 1
    assert "sigs" not in envelope
    assert signed["head"] == envelope["head"]
    assert signed["doc"] == envelope["doc"]
    assert verify_digest(signed)


def test_sign_twice_keeps_first(signed: dict[str, Any], key: SigningKey) -> None:
    twice = sign_envelope(signed, key)
    assert twice["sigs"][0] == signed["sigs"][0]
    assert len(twice["sigs"]) == 2


def test_sign_fixes_unsigned_digest(envelope: dict[str, Any], key: SigningKey) -> None:
    envelope["head"]["dig"]["val"] = "0" * 64
    signed = sign_envelope(envelope, key)
    assert verify_digest(signed)


def test_sign_signed_bad_digest_rejected(signed: dict[str, Any], key: SigningKey) -> None:
    signed["doc"]["code"] = "EDITED-1"
    with pytest.raises(DigestMismatch):
        sign_envelope(signed, key)


def test_protected_header_exact(token: str, key: SigningKey) -> None:
    header = b64url_decode(token.split(".")[0])
    assert header == f'{{"alg":"ES256","kid":"{key.kid}"}}'.encode()


def test_payload_is_canonical_head(token: str, envelope: dict[str, Any]) -> None:
    payload = b64url_decode(token.split(".")[1])
    head = envelope["head"]
    assert payload == canonical_json({"uuid": head["uuid"], "dig": head["dig"]})


def test_no_base64_padding(token: str) -> None:
    assert "=" not in token


def test_signature_raw_64_bytes(token: str) -> None:
    assert len(b64url_decode(token.split(".")[2])) == 64


def test_joserfc_verifies(token: str, key: SigningKey, envelope: dict[str, Any]) -> None:
    result = jws.deserialize_compact(token, ECKey.import_key(key.public_jwk()))
    assert result.protected == {"alg": "ES256", "kid": key.kid}
    assert json.loads(result.payload) == {
        "uuid": envelope["head"]["uuid"],
        "dig": envelope["head"]["dig"],
    }


def test_verify_returns_payload(token: str, key: SigningKey, envelope: dict[str, Any]) -> None:
    payload = verify_signature(token, key.public_jwk())
    assert payload == {"uuid": envelope["head"]["uuid"], "dig": envelope["head"]["dig"]}


def test_verify_joserfc_token(key: SigningKey) -> None:
    # A token made by an independent library must pass our verification too.
    private = ECKey.import_key(key.private_jwk())
    token = jws.serialize_compact({"alg": "ES256", "kid": key.kid}, b'{"a":1}', private)
    assert verify_signature(token, key.public_jwk()) == {"a": 1}


def tampered_payload(token: str) -> str:
    header, _, signature = token.split(".")
    payload = b64url_encode(b'{"dig":{"alg":"sha256","val":"00"},"uuid":"x"}')
    return f"{header}.{payload}.{signature}"


def tampered_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    return f"{header}.{payload}.{flip_first_character(signature)}"


@pytest.mark.parametrize("tamper", [tampered_payload, tampered_signature])
def test_tampered_rejected_by_us(token: str, key: SigningKey, tamper: Any) -> None:
    with pytest.raises(SignatureInvalid, match="does not verify"):
        verify_signature(tamper(token), key.public_jwk())


@pytest.mark.parametrize("tamper", [tampered_payload, tampered_signature])
def test_tampered_rejected_by_joserfc(token: str, key: SigningKey, tamper: Any) -> None:
    with pytest.raises(JoseError):
        jws.deserialize_compact(tamper(token), ECKey.import_key(key.public_jwk()))


def test_other_key_rejected(token: str) -> None:
    other = SigningKey.generate().public_jwk()
    other.pop("kid")
    with pytest.raises(SignatureInvalid, match="does not verify"):
        verify_signature(token, other)


def test_other_kid_rejected(token: str) -> None:
    other = SigningKey.generate().public_jwk()
    with pytest.raises(SignatureInvalid, match="signed by key"):
        verify_signature(token, other)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        pytest.param("a.b", "three dot-separated parts", id="two-parts"),
        pytest.param("a.b.c.d", "three dot-separated parts", id="four-parts"),
        pytest.param("e30=.e30.AA", "not valid base64url", id="padding"),
        pytest.param("bm90IGpzb24.e30.AA", "header is not valid JSON", id="header-not-json"),
        pytest.param("W10.e30.AA", "header must be a JSON object", id="header-array"),
    ],
)
def test_malformed_token_rejected(token: str, message: str, key: SigningKey) -> None:
    with pytest.raises(SignatureInvalid, match=message):
        verify_signature(token, key.public_jwk())


def test_other_algorithm_rejected(key: SigningKey) -> None:
    header = b64url_encode(b'{"alg":"HS256"}')
    with pytest.raises(SignatureInvalid, match="alg must be ES256, not 'HS256'"):
        verify_signature(f"{header}.e30.AA", key.public_jwk())


def test_short_signature_rejected(token: str, key: SigningKey) -> None:
    header, payload, _ = token.split(".")
    short = b64url_encode(b"\x01" * 70)
    with pytest.raises(SignatureInvalid, match="64 bytes, not 70"):
        verify_signature(f"{header}.{payload}.{short}", key.public_jwk())


def test_invalid_public_jwk_rejected(token: str) -> None:
    with pytest.raises(ValueError, match="kty must be 'EC'"):
        verify_signature(token, {"kty": "RSA"})


def test_public_jwk_members(key: SigningKey) -> None:
    jwk = key.public_jwk()
    assert set(jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert jwk["kty"] == "EC"
    assert jwk["crv"] == "P-256"
    assert jwk["alg"] == "ES256"
    assert jwk["use"] == "sig"
    assert jwk["kid"] == key.kid


def test_generated_kid_is_uuid7(key: SigningKey) -> None:
    assert uuid.UUID(key.kid).version == 7


def test_private_jwk_has_d(key: SigningKey) -> None:
    jwk = key.private_jwk()
    assert len(b64url_decode(jwk["d"])) == 32
    assert {k: v for k, v in jwk.items() if k != "d"} == key.public_jwk()


def test_repr_hides_private_key(key: SigningKey) -> None:
    text = repr(key)
    assert key.kid in text
    assert key.private_jwk()["d"] not in text
    assert text == f"SigningKey(kid={key.kid!r}, alg='ES256')"


def test_from_jwk_round_trip(key: SigningKey) -> None:
    assert SigningKey.from_jwk(key.private_jwk()).private_jwk() == key.private_jwk()


def test_from_jwk_joserfc_key() -> None:
    jwk = ECKey.generate_key("P-256", private=True).as_dict(private=True)
    jwk["kid"] = str(uuid.uuid4())
    assert SigningKey.from_jwk(jwk).public_jwk()["x"] == jwk["x"]


def test_from_jwk_mismatched_d(key: SigningKey) -> None:
    jwk = {**key.private_jwk(), "d": SigningKey.generate().private_jwk()["d"]}
    with pytest.raises(ValueError, match="does not match the private key d"):
        SigningKey.from_jwk(jwk)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"crv": "P-384"}, "crv must be 'P-256'", id="curve"),
        pytest.param({"alg": "RS256"}, "alg must be 'ES256'", id="alg"),
        pytest.param({"use": "enc"}, "use must be 'sig'", id="use"),
        pytest.param({"kid": "key-1"}, "kid must be a UUID string", id="kid"),
        pytest.param({"kid": None}, "kid is missing", id="no-kid"),
        pytest.param({"d": None}, "member d is missing", id="no-d"),
        pytest.param({"x": "AAAA"}, "member x must encode 32 bytes, not 3", id="short-x"),
        pytest.param({"y": "a+b/"}, "member y is not valid base64url", id="base64-y"),
    ],
)
def test_from_jwk_invalid(key: SigningKey, change: dict[str, Any], message: str) -> None:
    jwk = {**key.private_jwk(), **change}
    jwk = {name: value for name, value in jwk.items() if value is not None}
    with pytest.raises(ValueError, match=message):
        SigningKey.from_jwk(jwk)


def test_save_load_round_trip(key: SigningKey, tmp_path: Path) -> None:
    path = tmp_path / "keys" / "nested" / "key.jwk.json"
    key.save(path)
    assert SigningKey.load(path).private_jwk() == key.private_jwk()


def test_save_mode_0600(key: SigningKey, tmp_path: Path) -> None:
    path = tmp_path / "key.jwk.json"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_replaces_wider_mode(key: SigningKey, tmp_path: Path) -> None:
    path = tmp_path / "key.jwk.json"
    path.write_text("{}")
    path.chmod(0o644)
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_leaves_no_temporary(key: SigningKey, tmp_path: Path) -> None:
    key.save(tmp_path / "key.jwk.json")
    assert [path.name for path in tmp_path.iterdir()] == ["key.jwk.json"]


def test_save_new_keeps_existing(key: SigningKey, tmp_path: Path) -> None:
    path = tmp_path / "key.jwk.json"
    key.save(path)
    with pytest.raises(FileExistsError):
        SigningKey.generate().save_new(path)
    assert SigningKey.load(path).kid == key.kid
    assert [entry.name for entry in tmp_path.iterdir()] == ["key.jwk.json"]


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    expected = re.escape(f"signing key file {path} does not exist")
    with pytest.raises(FileNotFoundError, match=expected):
        SigningKey.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("not json", "is not valid JSON", id="not-json"),
        pytest.param("[]", "must contain a JSON object", id="array"),
        pytest.param('{"kty": "EC", "crv": "P-256"}', "member x is missing", id="no-x"),
    ],
)
def test_load_invalid_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "key.jwk.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        SigningKey.load(path)
    assert str(path) in str(caught.value)


def test_load_or_create_creates_then_reuses(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    created, was_created = load_or_create_key(None, data_dir)
    assert was_created
    assert (data_dir / DEFAULT_KEY_FILE_NAME).is_file()
    assert stat.S_IMODE((data_dir / DEFAULT_KEY_FILE_NAME).stat().st_mode) == 0o600

    reused, was_created_again = load_or_create_key(None, data_dir)
    assert not was_created_again
    assert reused.private_jwk() == created.private_jwk()


def test_load_or_create_configured(key: SigningKey, tmp_path: Path) -> None:
    path = tmp_path / "configured.jwk.json"
    key.save(path)
    loaded, was_created = load_or_create_key(path, tmp_path / "data")
    assert not was_created
    assert loaded.kid == key.kid
    assert not (tmp_path / "data").exists()


def test_load_or_create_configured_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_or_create_key(tmp_path / "absent.json", tmp_path / "data")
    assert not (tmp_path / "data").exists()
