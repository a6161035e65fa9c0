"""ES256 signing of GOBL envelopes as compact JWS, and the JWK key file it uses.

A signature is a compact JWS (RFC 7515) whose protected header is
``{"alg":"ES256","kid":<key id>}`` and whose payload is the canonical JSON of
``{"uuid": head.uuid, "dig": head.dig}``. The signature part is the raw 64-byte
``r || s`` pair that RFC 7518 section 3.4 requires, not the DER encoding that
OpenSSL produces.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import uuid6
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from worker.gobl.c14n import canonical_json
from worker.gobl.envelope import is_uuid, normalise_envelope

ALGORITHM = "ES256"

#: File name of the key created in the data folder when no key file is configured.
DEFAULT_KEY_FILE_NAME = "signing-key.jwk.json"

# P-256 coordinates, private scalars and each half of a signature are 32 bytes long.
_P256_SIZE = 32
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class SignatureInvalid(ValueError):
    """A JWS is malformed, uses another algorithm, or its signature does not verify."""


class SigningKey:
    """An ES256 (ECDSA on P-256 with SHA-256) private key with its key id ``kid``."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, kid: str) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError(f"ES256 needs a P-256 key, not {private_key.curve.name}")
        if not is_uuid(kid):
            raise ValueError(f"kid must be a UUID string, not {kid!r}")
        self._private_key = private_key
        self.kid = kid

    @classmethod
    def generate(cls) -> SigningKey:
        """Create a new random key whose ``kid`` is a new UUID v7."""
        return cls(ec.generate_private_key(ec.SECP256R1()), str(uuid6.uuid7()))

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> SigningKey:
        """Build a key from a private EC P-256 JWK with a UUID ``kid``.

        Raises:
            ValueError: a member is missing or invalid, or ``d`` does not match ``x``/``y``.
        """
        public_numbers = _public_numbers(jwk)
        secret = _decode_member(jwk, "d", _P256_SIZE)
        numbers = ec.EllipticCurvePrivateNumbers(int.from_bytes(secret, "big"), public_numbers)
        try:
            private_key = numbers.private_key()
        except ValueError as exc:
            raise ValueError(
                "JWK point x, y is not on the P-256 curve or does not match the private key d"
            ) from exc

        kid = jwk.get("kid")
        if not isinstance(kid, str):
            raise ValueError("JWK member kid is missing. It must be a UUID string.")
        return cls(private_key, kid)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read a private JWK from a JSON file.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not JSON or does not contain a valid ES256 private JWK.
        """
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"signing key file {path} does not exist") from exc
        try:
            jwk = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"signing key file {path} is not valid JSON: {exc}") from exc
        if not isinstance(jwk, dict):
            raise ValueError(f"signing key file {path} must contain a JSON object (a JWK)")
        try:
            return cls.from_jwk(jwk)
        except ValueError as exc:
            raise ValueError(f"signing key file {path} is not a valid ES256 JWK: {exc}") from exc

    def save(self, path: Path) -> None:
        """Write the private JWK to ``path`` with mode 0600, creating parent folders.

        The file is written to a temporary name and then renamed, so readers never see
        a partly written key. An existing file is replaced.
        """
        temporary = self._write_temporary(path)
        try:
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def save_new(self, path: Path) -> None:
        """Write the private JWK to ``path`` like ``save``, but never replace a file.

        Raises:
            FileExistsError: ``path`` already exists, for example because another
                process created its key first.
        """
        temporary = self._write_temporary(path)
        try:
            # A hard link fails when the target exists, unlike a rename.
            # NOTE: file systems without hard links raise OSError here.
            os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    def public_jwk(self) -> dict[str, str]:
        """Return the public JWK, with ``kid``, ``alg`` and ``use``."""
        numbers = self._private_key.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64url_encode(numbers.x.to_bytes(_P256_SIZE, "big")),
            "y": _b64url_encode(numbers.y.to_bytes(_P256_SIZE, "big")),
            "kid": self.kid,
            "alg": ALGORITHM,
            "use": "sig",
        }

    def private_jwk(self) -> dict[str, str]:
        """Return the public JWK plus the private scalar ``d``. Treat the result as a secret."""
        secret = self._private_key.private_numbers().private_value
        return {**self.public_jwk(), "d": _b64url_encode(secret.to_bytes(_P256_SIZE, "big"))}

    def sign(self, signing_input: bytes) -> bytes:
        """Sign ``signing_input`` and return the 64-byte ``r || s`` signature."""
        der = self._private_key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return r.to_bytes(_P256_SIZE, "big") + s.to_bytes(_P256_SIZE, "big")

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, alg={ALGORITHM!r})"

    def _write_temporary(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file with mode 0600, so other users cannot read the key at any point.
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        temporary = Path(name)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(self.private_jwk(), handle, indent=2, sort_keys=True)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return temporary


def load_or_create_key(configured: Path | None, data_dir: Path) -> tuple[SigningKey, bool]:
    """Load the signing key, creating one in ``data_dir`` when none is configured.

    With ``configured`` set, that file must exist. Otherwise the key is
    ``data_dir / DEFAULT_KEY_FILE_NAME``, created on first use. The boolean is True
    when this call created the key, so the caller can log its ``kid``.

    Raises:
        FileNotFoundError: ``configured`` is set but the file does not exist.
        ValueError: the key file is not a valid ES256 private JWK.
    """
    if configured is not None:
        return SigningKey.load(configured), False

    path = data_dir / DEFAULT_KEY_FILE_NAME
    with contextlib.suppress(FileNotFoundError):
        return SigningKey.load(path), False

    key = SigningKey.generate()
    try:
        key.save_new(path)
    except FileExistsError:
        # Another process created the key after our read failed, so use that key instead.
        return SigningKey.load(path), False
    return key, True


def sign_envelope(
    envelope: dict[str, Any], key: SigningKey, *, digest_checked: bool = False
) -> dict[str, Any]:
    """Sign the envelope with ES256 and return a copy with the new JWS appended to ``sigs``.

    The envelope goes through ``normalise_envelope`` first, so an unsigned envelope gets
    its head completed and its digest corrected before it is signed. A caller that
    holds an envelope it normalised before (a stored silo entry) passes
    ``digest_checked=True`` to skip recomputing the digest.

    Raises:
        DigestMismatch: the envelope is already signed and its digest is wrong.
        Unprocessable: the data is not a GOBL envelope or document.
    """
    if digest_checked:
        signed = {**envelope, "head": dict(envelope["head"])}
    else:
        signed = normalise_envelope(envelope)
    head = signed["head"]
    header = canonical_json({"alg": ALGORITHM, "kid": key.kid})
    payload = canonical_json({"uuid": head["uuid"], "dig": head["dig"]})

    signing_input = f"{_b64url_encode(header)}.{_b64url_encode(payload)}".encode("ascii")
    signature = key.sign(signing_input)
    token = f"{signing_input.decode('ascii')}.{_b64url_encode(signature)}"

    signed["sigs"] = [*(signed.get("sigs") or []), token]
    return signed


def verify_signature(token: str, public_jwk: Mapping[str, Any]) -> dict[str, Any]:
    """Verify a compact ES256 JWS against a public EC P-256 JWK and return its payload.

    When both the JWS header and the JWK carry a ``kid``, they must be equal.

    Raises:
        SignatureInvalid: the token is malformed, is not ES256, names another key,
            has a payload that is not a JSON object, or its signature does not verify.
        ValueError: ``public_jwk`` is not a valid EC P-256 public key.
    """
    public_key = _public_key(public_jwk)
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise SignatureInvalid("a compact JWS must have three dot-separated parts")
    encoded_header, encoded_payload, encoded_signature = parts

    _check_header(_decode_json_part(encoded_header, "header"), public_jwk.get("kid"))
    signature = _decode_part(encoded_signature, "signature")
    if len(signature) != 2 * _P256_SIZE:
        raise SignatureInvalid(f"an ES256 signature is 64 bytes, not {len(signature)}")

    r = int.from_bytes(signature[:_P256_SIZE], "big")
    s = int.from_bytes(signature[_P256_SIZE:], "big")
    signing_input = f"{encoded_header}.{encoded_payload}".encode("ascii")
    try:
        public_key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise SignatureInvalid("the JWS signature does not verify with the given key") from exc

    payload = _decode_json_part(encoded_payload, "payload")
    if not isinstance(payload, dict):
        raise SignatureInvalid("the JWS payload must be a JSON object")
    return payload


def _check_header(header: object, expected_kid: object) -> None:
    if not isinstance(header, dict):
        raise SignatureInvalid("the JWS protected header must be a JSON object")
    if header.get("alg") != ALGORITHM:
        raise SignatureInvalid(f"the JWS alg must be {ALGORITHM}, not {header.get('alg')!r}")
    if "crit" in header:
        # RFC 7515 section 4.1.11 requires rejecting crit extensions the verifier does not
        # understand, and this verifier understands none.
        raise SignatureInvalid("the JWS header has crit extensions, which are not supported")
    kid = header.get("kid")
    if kid is not None and expected_kid is not None and kid != expected_kid:
        raise SignatureInvalid(f"the JWS was signed by key {kid!r}, not {expected_kid!r}")


def _decode_json_part(encoded: str, name: str) -> object:
    try:
        return json.loads(_decode_part(encoded, name))
    except ValueError as exc:
        raise SignatureInvalid(f"the JWS {name} is not valid JSON: {exc}") from exc


def _decode_part(encoded: str, name: str) -> bytes:
    try:
        return _b64url_decode(encoded)
    except ValueError as exc:
        raise SignatureInvalid(f"the JWS {name} is not valid base64url: {exc}") from exc


def _public_numbers(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicNumbers:
    if jwk.get("kty") != "EC":
        raise ValueError(f"JWK kty must be 'EC', not {jwk.get('kty')!r}")
    if jwk.get("crv") != "P-256":
        raise ValueError(f"JWK crv must be 'P-256', not {jwk.get('crv')!r}")
    if jwk.get("alg", ALGORITHM) != ALGORITHM:
        raise ValueError(f"JWK alg must be {ALGORITHM!r}, not {jwk.get('alg')!r}")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"JWK use must be 'sig', not {jwk.get('use')!r}")

    x = int.from_bytes(_decode_member(jwk, "x", _P256_SIZE), "big")
    y = int.from_bytes(_decode_member(jwk, "y", _P256_SIZE), "big")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1())


def _public_key(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    try:
        return _public_numbers(jwk).public_key()
    except ValueError as exc:
        raise ValueError(f"invalid public JWK: {exc}") from exc


def _decode_member(jwk: Mapping[str, Any], name: str, size: int) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise ValueError(f"JWK member {name} is missing. It must be a base64url string.")
    try:
        decoded = _b64url_decode(value)
    except ValueError as exc:
        raise ValueError(f"JWK member {name} is not valid base64url: {exc}") from exc
    if len(decoded) != size:
        raise ValueError(f"JWK member {name} must encode {size} bytes, not {len(decoded)}")
    return decoded


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    # JOSE uses base64url without padding (RFC 7515 section 2), so "=" is rejected too.
    if _BASE64URL.fullmatch(text) is None:
        raise ValueError("only A-Z, a-z, 0-9, '-' and '_' are allowed, without padding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc
