"""Tests for wrapping, checking and updating GOBL envelopes."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from worker.errors import DigestMismatch, Unprocessable
from worker.gobl.c14n import digest
from worker.gobl.envelope import (
    ENVELOPE_SCHEMA,
    document_code,
    document_schema,
    is_signed,
    normalise_envelope,
    replace_document,
    verify_digest,
)

WRONG_DIGEST = "0" * 64
FAKE_SIGNATURE = "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"


def test_stored_digest_reproduced(envelope_path: Path) -> None:
    envelope = json.loads(envelope_path.read_text(encoding="utf-8"))
    assert envelope["head"]["dig"]["alg"] == "sha256"
    assert digest(envelope["doc"]) == envelope["head"]["dig"]["val"]
    assert verify_digest(envelope)


def test_stored_envelope_unchanged(envelope_path: Path) -> None:
    envelope = json.loads(envelope_path.read_text(encoding="utf-8"))
    assert normalise_envelope(envelope) == envelope


def test_bare_document_wrapped(invoice: dict[str, Any]) -> None:
    original = copy.deepcopy(invoice)
    wrapped = normalise_envelope(invoice)
    assert wrapped["$schema"] == ENVELOPE_SCHEMA
    assert uuid.UUID(wrapped["head"]["uuid"]).version == 7
    assert wrapped["head"]["dig"] == {"alg": "sha256", "val": digest(original)}
    assert wrapped["doc"] == original
    assert set(wrapped) == {"$schema", "head", "doc"}
    assert invoice == original


def test_bare_document_new_uuid_each_time(invoice: dict[str, Any]) -> None:
    first = normalise_envelope(invoice)["head"]["uuid"]
    second = normalise_envelope(invoice)["head"]["uuid"]
    assert first != second


def test_unsigned_wrong_digest_corrected(envelope: dict[str, Any]) -> None:
    envelope["head"]["dig"]["val"] = WRONG_DIGEST
    original = copy.deepcopy(envelope)
    fixed = normalise_envelope(envelope)
    assert fixed["head"]["dig"] == {"alg": "sha256", "val": digest(envelope["doc"])}
    assert fixed["head"]["uuid"] == envelope["head"]["uuid"]
    assert verify_digest(fixed)
    assert envelope == original


def test_unsigned_missing_digest_added(envelope: dict[str, Any]) -> None:
    del envelope["head"]["dig"]
    fixed = normalise_envelope(envelope)
    assert fixed["head"]["dig"]["val"] == digest(envelope["doc"])


def test_unsigned_other_algorithm_replaced(envelope: dict[str, Any]) -> None:
    envelope["head"]["dig"]["alg"] = "sha512"
    fixed = normalise_envelope(envelope)
    assert fixed["head"]["dig"]["alg"] == "sha256"


def test_missing_head_created(envelope: dict[str, Any]) -> None:
    del envelope["head"]
    fixed = normalise_envelope(envelope)
    assert uuid.UUID(fixed["head"]["uuid"]).version == 7
    assert fixed["head"]["dig"]["val"] == digest(envelope["doc"])


def test_head_extra_fields_kept(gobl_dir: Path) -> None:
    envelope = json.loads((gobl_dir / "be-invoice-peppol.json").read_text(encoding="utf-8"))
    envelope["head"]["dig"]["val"] = WRONG_DIGEST
    fixed = normalise_envelope(envelope)
    assert fixed["head"]["from"] == envelope["head"]["from"]
    assert fixed["head"]["to"] == envelope["head"]["to"]


def test_signed_wrong_digest_rejected(envelope: dict[str, Any]) -> None:
    envelope["head"]["dig"]["val"] = WRONG_DIGEST
    envelope["sigs"] = [FAKE_SIGNATURE]
    with pytest.raises(DigestMismatch) as caught:
        normalise_envelope(envelope)
    message = caught.value.message
    assert WRONG_DIGEST in message
    assert digest(envelope["doc"]) in message
    assert "signed, so it cannot be changed" in message
    assert caught.value.faults[0].code == "digest-mismatch"
    assert caught.value.faults[0].paths == ("data.head.dig.val",)


def test_signed_missing_digest_rejected(envelope: dict[str, Any]) -> None:
    del envelope["head"]["dig"]
    envelope["sigs"] = [FAKE_SIGNATURE]
    with pytest.raises(DigestMismatch, match=r"head\.dig\.val is missing"):
        normalise_envelope(envelope)


def test_signed_missing_head_rejected(envelope: dict[str, Any]) -> None:
    del envelope["head"]
    envelope["sigs"] = [FAKE_SIGNATURE]
    with pytest.raises(DigestMismatch):
        normalise_envelope(envelope)


def test_signed_correct_digest_accepted(envelope: dict[str, Any]) -> None:
    envelope["sigs"] = [FAKE_SIGNATURE]
    assert normalise_envelope(envelope) == envelope


def test_signed_edited_doc_rejected(envelope: dict[str, Any]) -> None:
    envelope["sigs"] = [FAKE_SIGNATURE]
    envelope["doc"]["code"] = "EDITED-1"
    with pytest.raises(DigestMismatch):
        normalise_envelope(envelope)


def reject_reason(data: Any) -> Unprocessable:
    with pytest.raises(Unprocessable) as caught:
        normalise_envelope(data)
    return caught.value


def test_missing_schema_rejected() -> None:
    error = reject_reason({"type": "standard"})
    assert "data has no $schema" in error.message
    assert "a GOBL envelope" in error.message
    assert "https://gobl.org/draft-0/" in error.message
    assert error.faults[0].code == "missing-schema"
    assert error.faults[0].paths == ("data.$schema",)


def test_non_string_schema_rejected() -> None:
    error = reject_reason({"$schema": 7})
    assert "must be a string, not a number" in error.message
    assert error.faults[0].code == "unsupported-schema"


def test_foreign_schema_rejected() -> None:
    error = reject_reason({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    assert "'https://json-schema.org/draft/2020-12/schema' is not a GOBL schema" in error.message
    assert "bare GOBL document whose $schema starts with https://gobl.org/draft-0/" in (
        error.message
    )
    assert error.faults[0].paths == ("data.$schema",)


def test_bare_prefix_rejected() -> None:
    error = reject_reason({"$schema": "https://gobl.org/draft-0/"})
    assert error.faults[0].code == "unsupported-schema"


def test_non_object_rejected() -> None:
    error = reject_reason(["not", "an", "object"])
    assert "data must be a JSON object, not an array" in error.message
    assert error.faults[0].code == "invalid-type"


def test_envelope_without_doc_rejected() -> None:
    error = reject_reason({"$schema": ENVELOPE_SCHEMA})
    assert "needs a doc object, got null" in error.message
    assert error.faults[0].paths == ("data.doc",)


def test_doc_without_gobl_schema_rejected(envelope: dict[str, Any]) -> None:
    envelope["doc"]["$schema"] = ENVELOPE_SCHEMA
    error = reject_reason(envelope)
    assert "doc.$schema must be a GOBL document schema" in error.message
    assert error.faults[0].paths == ("data.doc.$schema",)


def test_head_not_object_rejected(envelope: dict[str, Any]) -> None:
    envelope["head"] = "head"
    error = reject_reason(envelope)
    assert error.message == "head must be an object, not a string"


@pytest.mark.parametrize("value", [None, 12, "not-a-uuid"], ids=["missing", "number", "text"])
def test_bad_head_uuid_rejected(envelope: dict[str, Any], value: object) -> None:
    envelope["head"]["uuid"] = value
    error = reject_reason(envelope)
    assert error.faults[0].code == "invalid-uuid"
    assert error.faults[0].paths == ("data.head.uuid",)


def test_bad_sigs_rejected(envelope: dict[str, Any]) -> None:
    envelope["sigs"] = [{"not": "a token"}]
    error = reject_reason(envelope)
    assert error.faults[0].code == "invalid-signatures"


def test_nan_in_doc_rejected(invoice: dict[str, Any]) -> None:
    invoice["rate"] = float("nan")
    error = reject_reason(invoice)
    assert "doc has no canonical JSON form" in error.message
    assert error.faults[0].code == "invalid-document"
    assert isinstance(error.__cause__, ValueError)


def test_is_signed(envelope: dict[str, Any]) -> None:
    assert not is_signed(envelope)
    assert not is_signed({**envelope, "sigs": []})
    assert is_signed({**envelope, "sigs": [FAKE_SIGNATURE]})


def test_document_schema(envelope: dict[str, Any]) -> None:
    assert document_schema(envelope) == "https://gobl.org/draft-0/bill/invoice"
    assert document_schema({"$schema": ENVELOPE_SCHEMA}) is None


def test_document_code(envelope: dict[str, Any]) -> None:
    assert document_code(envelope) == "SAMPLE-001"


def test_document_code_without_series(envelope: dict[str, Any]) -> None:
    envelope["doc"]["series"] = "F2024"
    assert document_code(envelope) == "SAMPLE-001"


@pytest.mark.parametrize("value", [None, ""], ids=["missing", "empty"])
def test_document_code_absent(envelope: dict[str, Any], value: object) -> None:
    envelope["doc"]["code"] = value
    assert document_code(envelope) is None


def test_verify_digest_mismatch(envelope: dict[str, Any]) -> None:
    envelope["doc"]["code"] = "EDITED-1"
    assert not verify_digest(envelope)


def test_verify_digest_malformed(envelope: dict[str, Any]) -> None:
    assert not verify_digest({"head": envelope["head"]})
    assert not verify_digest({"doc": envelope["doc"]})
    assert not verify_digest({**envelope, "doc": {"n": float("inf")}})


def test_replace_document(envelope: dict[str, Any]) -> None:
    original = copy.deepcopy(envelope)
    doc = {**envelope["doc"], "code": "SAMPLE-002"}
    replaced = replace_document(envelope, doc)
    assert replaced["doc"] == doc
    assert replaced["head"]["dig"]["val"] == digest(doc)
    assert replaced["head"]["dig"]["val"] != original["head"]["dig"]["val"]
    assert replaced["head"]["uuid"] == original["head"]["uuid"]
    assert verify_digest(replaced)
    assert envelope == original


def test_replace_document_leaves_input(envelope: dict[str, Any]) -> None:
    original = copy.deepcopy(envelope)
    replaced = replace_document(envelope, {**envelope["doc"], "code": "SAMPLE-002"})
    assert replaced["doc"]["code"] == "SAMPLE-002"
    assert envelope == original


def test_replace_document_signed_rejected(envelope: dict[str, Any]) -> None:
    envelope["sigs"] = [FAKE_SIGNATURE]
    with pytest.raises(Unprocessable) as caught:
        replace_document(envelope, {**envelope["doc"], "code": "SAMPLE-002"})
    assert caught.value.faults[0].code == "envelope-signed"
    assert "signed envelope is never modified" in caught.value.message


def test_replace_document_bad_doc_rejected(envelope: dict[str, Any]) -> None:
    with pytest.raises(Unprocessable) as caught:
        replace_document(envelope, {"code": "SAMPLE-002"})
    assert caught.value.faults[0].paths == ("data.doc.$schema",)
