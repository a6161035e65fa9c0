"""The ``pdf`` action and its renderer, on the shared GOBL envelopes.

Rendered files are read back with pypdf, so the checks look at the text a reader of
the PDF gets, not at how fpdf2 was called.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pypdf import PdfReader

from contracts import Status
from tests.factories import all_envelope_paths, load_envelope
from worker.actions import pdf
from worker.actions.base import ActionResult, Services, StepContext
from worker.actions.registry import ActionRegistry
from worker.gobl.signing import SigningKey

DOCUMENT_SCHEMA_INVOICE = "https://gobl.org/draft-0/bill/invoice"


def schema_of(path: Path) -> str:
    schema: str = json.loads(path.read_text(encoding="utf-8"))["doc"]["$schema"]
    return schema


INVOICE_FILES = [
    path.name for path in all_envelope_paths() if schema_of(path) == DOCUMENT_SCHEMA_INVOICE
]

#: Envelopes whose text is checked: Spanish, German, Polish (ł) and Greek.
TEXT_CHECK_FILES = [
    "es-invoice-es-es.env.json",
    "de-invoice-de-de-stnr.json",
    "pl-invoice-standard.json",
    "gr-invoice-el-el.json",
]


class UnusedNumbers:
    async def assign(self, series: str, *, start: int) -> int:
        raise AssertionError("the pdf action does not number documents")


async def unused_signing_key() -> SigningKey:
    raise AssertionError("the pdf action does not sign documents")


def make_context(
    envelope: dict[str, Any] | None,
    config: dict[str, Any] | None = None,
    *,
    entry_id: str | None = "entry-1",
) -> StepContext[pdf.PdfConfig]:
    return StepContext(
        job_id="job-1",
        workspace_id="default",
        workflow_id="invoice",
        step_id="pdf",
        key=None,
        tags=(),
        meta={},
        config=pdf.PdfConfig.model_validate(config or {}),
        envelope=envelope,
        entry_id=entry_id if envelope is not None else None,
        entry_state=None,
        entry_folder=None,
        services=Services(numbers=UnusedNumbers(), signing_key=unused_signing_key),
    )


def pdf_text(data: bytes) -> str:
    """Return the text of every page, with runs of whitespace collapsed to one space."""
    reader = PdfReader(BytesIO(data))
    return " ".join(" ".join(page.extract_text().split()) for page in reader.pages)


def squash(text: str) -> str:
    return " ".join(text.split())


def only_attachment(result: ActionResult) -> Any:
    assert len(result.attachments) == 1
    return result.attachments[0]


# Renderer


@pytest.mark.parametrize("name", INVOICE_FILES)
def test_render_invoice_every_envelope(name: str) -> None:
    data = pdf.render_invoice(load_envelope(name))

    assert data.startswith(b"%PDF-")
    assert len(PdfReader(BytesIO(data)).pages) >= 1


@pytest.mark.parametrize("name", TEXT_CHECK_FILES)
def test_render_invoice_prints_document_fields(name: str) -> None:
    envelope = load_envelope(name)
    doc = envelope["doc"]

    text = pdf_text(pdf.render_invoice(envelope))

    assert doc["code"] in text
    assert pdf.full_code(doc) in text
    assert squash(doc["supplier"]["name"]) in text
    assert squash(doc["customer"]["name"]) in text
    for line in doc["lines"]:
        assert squash(line["item"]["name"]) in text
    assert doc["totals"]["total_with_tax"] in text
    assert doc["issue_date"] in text


def test_render_invoice_prints_greek_letters() -> None:
    envelope = load_envelope("gr-invoice-el-el.json")

    text = pdf_text(pdf.render_invoice(envelope))

    assert "Αθήνα" in text
    assert "?" not in text


def test_render_invoice_prints_tax_breakdown() -> None:
    envelope = load_envelope("it-freelance.json")
    categories = envelope["doc"]["totals"]["taxes"]["categories"]

    text = pdf_text(pdf.render_invoice(envelope))

    for category in categories:
        for rate in category["rates"]:
            assert f"{rate['base']} {rate['amount']}" in text
    assert "IRPEF (retained)" in text
    assert f"Retained tax {envelope['doc']['totals']['retained_tax']}" in text
    assert f"Payable {envelope['doc']['totals']['payable']}" in text


def test_render_invoice_prints_document_charges() -> None:
    envelope = load_envelope("es-invoice-es-es-only-charges.json")
    charge = envelope["doc"]["charges"][0]

    text = pdf_text(pdf.render_invoice(envelope))

    assert charge["reason"] in text
    assert f"Charge {envelope['doc']['totals']['charge']}" in text


def test_render_invoice_prints_payment_details() -> None:
    envelope = load_envelope("es-invoice-es-es-freelance.json")
    account = envelope["doc"]["payment"]["instructions"]["credit_transfer"][0]

    text = pdf_text(pdf.render_invoice(envelope))

    assert "Payment terms instant" in text
    assert "Payment instructions credit-transfer" in text
    assert f"{account['name']}, IBAN {account['iban']}" in text


def test_render_invoice_prints_due_dates() -> None:
    envelope = load_envelope("ar-invoice-ar-arca-services.json")
    due_dates = envelope["doc"]["payment"]["terms"]["due_dates"]

    text = pdf_text(pdf.render_invoice(envelope))

    for due in due_dates:
        assert f"{due['date']} {due['amount']}" in text


def test_render_invoice_prints_notes() -> None:
    envelope = load_envelope("pl-invoice-exempt.json")

    text = pdf_text(pdf.render_invoice(envelope))

    assert f"Notes {envelope['doc']['notes'][0]['text']}" in text


def test_render_invoice_prints_preceding() -> None:
    envelope = load_envelope("ar-invoice-ar-arca-credit-note.json")

    text = pdf_text(pdf.render_invoice(envelope))

    assert "Preceding documents 1-00000123 (2025-01-15)" in text


def test_render_invoice_is_deterministic() -> None:
    envelope = load_envelope("gr-invoice-el-el.json")

    first = pdf.render_invoice(envelope)
    second = pdf.render_invoice(copy.deepcopy(envelope))

    assert first == second


def test_creation_date_is_issue_date() -> None:
    envelope = load_envelope()

    reader = PdfReader(BytesIO(pdf.render_invoice(envelope)))

    assert reader.metadata is not None
    assert reader.metadata.creation_date == datetime(2022, 2, 1, tzinfo=UTC)


def test_render_invoice_spanish_labels() -> None:
    text = pdf_text(pdf.render_invoice(load_envelope(), locale="es-ES"))

    assert "Factura SAMPLE-001" in text
    assert "Fecha de emisión 2022-02-01" in text
    assert "Total con impuestos 1210.00" in text
    assert "Invoice" not in text
    assert "Issue date" not in text


def test_unknown_locale_uses_english() -> None:
    text = pdf_text(pdf.render_invoice(load_envelope(), locale="fr"))

    assert "Invoice SAMPLE-001" in text
    assert "Total with tax 1210.00" in text


def test_spanish_labels_cover_english_keys() -> None:
    assert set(pdf.LABELS["es"]) == set(pdf.LABELS["en"])


@pytest.mark.parametrize(
    ("name", "title"),
    [
        ("es-credit-note-es-es-tbai.json", "Credit note FR-012"),
        ("es-order.json", "Order ORD-0001"),
        ("es-delivery.json", "Delivery note DLV-0001"),
    ],
)
def test_title_from_schema_and_type(name: str, title: str) -> None:
    text = pdf_text(pdf.render_invoice(load_envelope(name)))

    assert text.startswith(title)


@pytest.mark.parametrize("name", ["es-payment.json", "es-status-update.json", "es-party.json"])
def test_render_rejects_documents_without_totals(name: str) -> None:
    with pytest.raises(pdf.UnsupportedDocument, match="totals"):
        pdf.render_invoice(load_envelope(name))


def test_cached_font_matches_add_font(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-process font copies give the same file as fpdf2 loading the font itself."""
    names = ["es-invoice-es-es.env.json", "gr-invoice-el-el.json", "pl-invoice-standard.json"]
    cached = [pdf.render_invoice(load_envelope(name)) for name in names]

    def add_font(self: Any, document: Any) -> None:
        document.add_font("body", self.style, self.path)

    monkeypatch.setattr(pdf._ParsedFont, "add_to", add_font)
    loaded = [pdf.render_invoice(load_envelope(name)) for name in names]

    for name, cached_data, loaded_data in zip(names, cached, loaded, strict=True):
        assert cached_data == loaded_data, name


def test_concurrent_renders_match() -> None:
    envelope = load_envelope("gr-invoice-el-el.json")
    expected = pdf.render_invoice(envelope)
    results: list[bytes] = []

    def render() -> None:
        results.append(pdf.render_invoice(envelope))

    threads = [threading.Thread(target=render) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 4
    assert all(result == expected for result in results)


def test_render_without_dejavu_uses_helvetica(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(pdf, "DEFAULT_FONT_FILE", tmp_path / "missing.ttf")
    envelope = load_envelope("gr-invoice-el-el.json")

    data = pdf.render_invoice(envelope)
    text = pdf_text(data)

    assert b"/BaseFont /Helvetica" in data
    assert envelope["doc"]["code"] in text
    assert envelope["doc"]["totals"]["total_with_tax"] in text
    assert "Αθήνα" not in text
    assert "11636 ?????" in text


def test_render_invoice_custom_font_file() -> None:
    serif = "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"
    if not Path(serif).is_file():
        pytest.skip(f"{serif} is not installed")

    data = pdf.render_invoice(load_envelope(), font_file=serif)

    assert b"DejaVuSerif" in data
    assert b"DejaVuSans" not in data
    assert "Provide One S.L." in pdf_text(data)


def test_render_invoice_missing_font_file(tmp_path: Path) -> None:
    with pytest.raises(pdf.FontUnavailable, match="not found"):
        pdf.render_invoice(load_envelope(), font_file=str(tmp_path / "absent.ttf"))


def test_render_invoice_invalid_font_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ttf"
    broken.write_bytes(b"not a font")

    with pytest.raises(pdf.FontUnavailable, match="not a valid font"):
        pdf.render_invoice(load_envelope(), font_file=str(broken))


# Config


@pytest.mark.parametrize(
    "config",
    [
        {"locale": "es"},
        {"locale": "es-ES"},
        {"locale": "pt_BR"},
        {"font_file": "/opt/fonts/Body.ttf"},
        {},
    ],
)
def test_config_accepts(config: dict[str, Any]) -> None:
    assert pdf.PdfConfig.model_validate(config)


@pytest.mark.parametrize(
    "config",
    [
        {"locale": "spanish please"},
        {"locale": ""},
        {"font_file": "fonts/Body.ttf"},
        {"font_file": "/etc/passwd"},
        {"paper": "A4"},
    ],
)
def test_config_rejects(config: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        pdf.PdfConfig.model_validate(config)


def test_action_spec_registers_as_pdf() -> None:
    registry = ActionRegistry(pdf.ACTIONS)

    spec = registry.get("pdf")

    assert spec is not None
    assert spec.config_model is pdf.PdfConfig


# Action


async def test_action_attaches_pdf() -> None:
    result = await pdf.render_pdf(make_context(load_envelope()))

    assert result.status is Status.OK
    attachment = only_attachment(result)
    assert attachment.key == "pdf"
    assert attachment.name == "SAMPLE-001.pdf"
    assert attachment.mime == "application/pdf"
    assert attachment.category == "pdf"
    assert attachment.data.startswith(b"%PDF-")
    assert attachment.desc == "Invoice SAMPLE-001 (PDF)"


async def test_action_names_file_with_series() -> None:
    result = await pdf.render_pdf(make_context(load_envelope("pl-invoice-standard.json")))

    assert only_attachment(result).name == "INVOICE-001.pdf"


async def test_action_names_file_safely() -> None:
    envelope = load_envelope()
    envelope["doc"]["series"] = "2024/A"

    result = await pdf.render_pdf(make_context(envelope))

    assert only_attachment(result).name == "2024-A-SAMPLE-001.pdf"


async def test_action_names_file_after_entry() -> None:
    envelope = load_envelope("it-b2c-corrective.json")
    assert "code" not in envelope["doc"]

    result = await pdf.render_pdf(make_context(envelope, entry_id="0190aaaa-entry"))

    assert only_attachment(result).name == "0190aaaa-entry.pdf"


async def test_action_spanish_locale() -> None:
    result = await pdf.render_pdf(make_context(load_envelope(), {"locale": "es"}))

    attachment = only_attachment(result)
    assert "Factura SAMPLE-001" in pdf_text(attachment.data)
    assert attachment.desc == "Factura SAMPLE-001 (PDF)"


async def test_action_reports_locale_fallback() -> None:
    result = await pdf.render_pdf(make_context(load_envelope(), {"locale": "de"}))

    assert result.status is Status.OK
    assert result.message is not None
    assert "with English labels, because locale de has none" in result.message


async def test_action_without_document_is_ko() -> None:
    result = await pdf.render_pdf(make_context(None))

    assert result.status is Status.KO
    assert result.code == "no-entry"
    assert not result.attachments


async def test_action_unsupported_document_is_ko() -> None:
    result = await pdf.render_pdf(make_context(load_envelope("es-payment.json")))

    assert result.status is Status.KO
    assert result.code == "unsupported-document"
    assert result.message is not None
    assert "payment" in result.message


async def test_action_missing_font_file_is_ko(tmp_path: Path) -> None:
    config = {"font_file": str(tmp_path / "absent.ttf")}

    result = await pdf.render_pdf(make_context(load_envelope(), config))

    assert result.status is Status.KO
    assert result.code == "font-unavailable"


async def test_action_renders_off_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    render_threads: list[int] = []
    render: Callable[..., bytes] = pdf.render_invoice

    def recording_render(*args: Any, **kwargs: Any) -> bytes:
        render_threads.append(threading.get_ident())
        return render(*args, **kwargs)

    monkeypatch.setattr(pdf, "render_invoice", recording_render)

    result = await pdf.render_pdf(make_context(load_envelope()))

    assert result.status is Status.OK
    assert len(render_threads) == 1
    assert render_threads[0] != threading.get_ident()


async def test_action_leaves_envelope_unchanged() -> None:
    envelope = load_envelope()
    before = copy.deepcopy(envelope)

    await pdf.render_pdf(make_context(envelope))

    assert envelope == before
