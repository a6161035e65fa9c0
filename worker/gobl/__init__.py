"""GOBL canonical JSON, envelope handling and ES256 envelope signing."""

from worker.gobl.c14n import canonical_json, digest
from worker.gobl.envelope import (
    DOCUMENT_SCHEMA_PREFIX,
    ENVELOPE_SCHEMA,
    document_code,
    document_schema,
    is_signed,
    normalise_envelope,
    replace_document,
    verify_digest,
)
from worker.gobl.signing import (
    SignatureInvalid,
    SigningKey,
    load_or_create_key,
    sign_envelope,
    verify_signature,
)

__all__ = [
    "DOCUMENT_SCHEMA_PREFIX",
    "ENVELOPE_SCHEMA",
    "SignatureInvalid",
    "SigningKey",
    "canonical_json",
    "digest",
    "document_code",
    "document_schema",
    "is_signed",
    "load_or_create_key",
    "normalise_envelope",
    "replace_document",
    "sign_envelope",
    "verify_digest",
    "verify_signature",
]
