"""GOBL envelopes: wrapping bare documents, checking and recomputing ``head.dig``.

An envelope is ``{"$schema": ENVELOPE_SCHEMA, "head": {...}, "doc": {...}, "sigs": [...]}``.
``head.dig`` is the SHA-256 digest of the canonical JSON of ``doc``. Each signature in
``sigs`` covers ``head.uuid`` and ``head.dig``, so a signed envelope must not change.

Every function here returns new dictionaries and leaves its arguments untouched.
Fault paths start with ``data`` because the envelope arrives in a command's ``data`` field.
"""

from __future__ import annotations

import re
from typing import Any

import uuid6

from contracts.commands import quote
from worker.errors import DigestMismatch, FaultDetail, Unprocessable
from worker.gobl.c14n import digest

ENVELOPE_SCHEMA = "https://gobl.org/draft-0/envelope"

#: Every GOBL document schema starts with this prefix, for example
#: ``https://gobl.org/draft-0/bill/invoice``.
DOCUMENT_SCHEMA_PREFIX = "https://gobl.org/draft-0/"

DIGEST_ALGORITHM = "sha256"

_ACCEPTED = (
    f"Send a GOBL envelope (with $schema {ENVELOPE_SCHEMA}) or a bare GOBL document "
    f"whose $schema starts with {DOCUMENT_SCHEMA_PREFIX}."
)

_UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


def is_uuid(value: object) -> bool:
    """Return whether ``value`` is a UUID in the hyphenated 36-character form."""
    return isinstance(value, str) and _UUID_PATTERN.fullmatch(value) is not None


def is_document_schema(value: object) -> bool:
    """Return whether ``value`` names a GOBL document schema (not the envelope schema)."""
    return (
        isinstance(value, str)
        and value.startswith(DOCUMENT_SCHEMA_PREFIX)
        and len(value) > len(DOCUMENT_SCHEMA_PREFIX)
        and value != ENVELOPE_SCHEMA
    )


def normalise_envelope(data: dict[str, Any]) -> dict[str, Any]:
    """Wrap a bare GOBL document in an envelope, or check and complete an envelope.

    A bare document gets a new envelope with a UUID v7 ``head.uuid`` and its digest.
    An envelope without ``head`` gets one. An unsigned envelope whose digest is
    missing or wrong gets it recomputed. ``data`` is not modified, but the result
    shares its document with ``data``, so neither may be changed in place afterwards.

    Raises:
        DigestMismatch: the envelope is signed and ``head.dig`` is not the digest of ``doc``.
        Unprocessable: ``data`` is neither a GOBL envelope nor a bare GOBL document, or
            the envelope is malformed.
    """
    if not isinstance(data, dict):
        raise _reject(
            "invalid-type",
            f"data must be a JSON object, not {_json_type(data)}. {_ACCEPTED}",
            "data",
        )

    schema = data.get("$schema")
    if schema == ENVELOPE_SCHEMA:
        return _normalise_existing(data)
    if is_document_schema(schema):
        return _wrap_document(data)
    raise _unsupported_schema(schema)


def is_signed(envelope: dict[str, Any]) -> bool:
    """Return whether the envelope carries at least one signature in ``sigs``."""
    sigs = envelope.get("sigs")
    return isinstance(sigs, list) and len(sigs) > 0


def document_schema(envelope: dict[str, Any]) -> str | None:
    """Return the ``$schema`` of the envelope's document, or None when it has none."""
    schema = _document(envelope).get("$schema")
    return schema if isinstance(schema, str) else None


def document_code(envelope: dict[str, Any]) -> str | None:
    """Return the document's ``code`` (without its series), or None when it is missing or empty."""
    code = _document(envelope).get("code")
    return code if isinstance(code, str) and code else None


def verify_digest(envelope: dict[str, Any]) -> bool:
    """Return whether ``head.dig`` is the SHA-256 digest of ``doc``.

    A missing or malformed head, a missing document, or a document that has no
    canonical form (a NaN, say) all count as a mismatch.
    """
    head = envelope.get("head")
    doc = envelope.get("doc")
    if not isinstance(head, dict) or not isinstance(doc, dict):
        return False
    try:
        computed = digest(doc)
    except ValueError:
        return False
    return _stored_digest(head) == computed


def replace_document(envelope: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """Replace the envelope's document and return the new envelope with ``head.dig`` recomputed.

    Raises:
        Unprocessable: the envelope is signed (code ``envelope-signed``), or the new
            document or the envelope is not valid GOBL.
    """
    if is_signed(envelope):
        raise _reject(
            "envelope-signed",
            "the envelope is signed and a signed envelope is never modified, "
            "so its document cannot be replaced",
            "data.sigs",
        )
    replaced = {**envelope, "doc": doc}
    return _normalise_existing(replaced)


def _normalise_existing(data: dict[str, Any]) -> dict[str, Any]:
    # Only the top level and the head may change, so only they are copied; the new
    # envelope shares the document (and the signatures) with ``data``.
    envelope = dict(data)
    if isinstance(envelope.get("head"), dict):
        envelope["head"] = dict(envelope["head"])
    doc = _check_document(envelope.get("doc"))
    _check_sigs(envelope.get("sigs"))
    computed = _digest_document(doc)

    head = envelope.get("head")
    if head is None:
        if is_signed(envelope):
            raise _digest_mismatch(None, computed)
        envelope["head"] = _new_head(computed)
        return envelope
    if not isinstance(head, dict):
        raise _reject(
            "invalid-head", f"head must be an object, not {_json_type(head)}", "data.head"
        )
    head_uuid = head.get("uuid")
    if not is_uuid(head_uuid):
        problem = "is missing" if head_uuid is None else f"is {quote(head_uuid)}"
        raise _reject(
            "invalid-uuid",
            f"head.uuid {problem} but must be a UUID string",
            "data.head.uuid",
        )

    stored = _stored_digest(head)
    if stored == computed:
        return envelope
    if is_signed(envelope):
        raise _digest_mismatch(stored, computed)
    head["dig"] = {"alg": DIGEST_ALGORITHM, "val": computed}
    return envelope


def _wrap_document(data: dict[str, Any]) -> dict[str, Any]:
    # The envelope uses ``data`` itself as its document: no copy is made.
    return {
        "$schema": ENVELOPE_SCHEMA,
        "head": _new_head(_digest_document(data)),
        "doc": data,
    }


def _new_head(computed: str) -> dict[str, Any]:
    return {
        "uuid": str(uuid6.uuid7()),
        "dig": {"alg": DIGEST_ALGORITHM, "val": computed},
    }


def _document(envelope: dict[str, Any]) -> dict[str, Any]:
    doc = envelope.get("doc")
    return doc if isinstance(doc, dict) else {}


def _stored_digest(head: dict[str, Any]) -> str | None:
    # A digest under another algorithm cannot be compared, so it counts as missing.
    dig = head.get("dig")
    if not isinstance(dig, dict) or dig.get("alg") != DIGEST_ALGORITHM:
        return None
    value = dig.get("val")
    return value if isinstance(value, str) else None


def _digest_document(doc: dict[str, Any]) -> str:
    try:
        return digest(doc)
    except ValueError as exc:
        raise _reject(
            "invalid-document", f"doc has no canonical JSON form: {exc}", "data.doc"
        ) from exc


def _check_document(doc: object) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise _reject(
            "missing-document",
            f"a GOBL envelope needs a doc object, got {_json_type(doc)}",
            "data.doc",
        )
    schema = doc.get("$schema")
    if not is_document_schema(schema):
        raise _reject(
            "unsupported-schema",
            f"doc.$schema must be a GOBL document schema starting with "
            f"{DOCUMENT_SCHEMA_PREFIX}, not {quote(schema, 120)}",
            "data.doc.$schema",
        )
    return doc


def _check_sigs(sigs: object) -> None:
    if sigs is None:
        return
    if not isinstance(sigs, list) or not all(isinstance(sig, str) for sig in sigs):
        raise _reject(
            "invalid-signatures",
            "sigs must be a list of compact JWS strings",
            "data.sigs",
        )


def _unsupported_schema(schema: object) -> Unprocessable:
    if schema is None:
        return _reject("missing-schema", f"data has no $schema. {_ACCEPTED}", "data.$schema")
    if not isinstance(schema, str):
        return _reject(
            "unsupported-schema",
            f"data.$schema must be a string, not {_json_type(schema)}. {_ACCEPTED}",
            "data.$schema",
        )
    return _reject(
        "unsupported-schema",
        f"data.$schema {quote(schema, 120)} is not a GOBL schema. {_ACCEPTED}",
        "data.$schema",
    )


def _digest_mismatch(stored: str | None, computed: str) -> DigestMismatch:
    message = (
        f"head.dig.val is {stored or 'missing'} but the digest of doc is {computed}. "
        "The envelope is signed, so it cannot be changed to match."
    )
    fault = FaultDetail("digest-mismatch", message, ("data.head.dig.val",))
    return DigestMismatch(message, faults=[fault])


def _reject(code: str, message: str, path: str) -> Unprocessable:
    return Unprocessable(message, faults=[FaultDetail(code, message, (path,))])


def _json_type(value: object) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)
