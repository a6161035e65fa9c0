"""``pdf``: render the job's GOBL document to a PDF attachment.

The layout prints what the document states and computes nothing: GOBL amounts are
decimal strings that are already rounded, so they appear exactly as given. Invoices,
orders and deliveries share the fields the layout uses (parties, lines, totals), so all
three render. Documents without ``totals`` (payments, statuses, parties) get KO
``unsupported-document``.

Labels exist in English and Spanish, and any other locale gets the English labels.
Text is set in DejaVu Sans, which covers Latin, Greek and Cyrillic. The step's
``font_file`` replaces it. Without either font, the core Helvetica font prints
Windows-1252 characters only. Each font file is read and parsed once per process, but
every document still subsets its own copy of the font, which is most of the render time.

Two renders of the same envelope, with the same locale, font and fpdf2 version, give
byte-identical files: the creation date is the document's issue date (midnight UTC) and
fpdf2 derives the file identifier from the content.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from io import BytesIO
from pathlib import Path
from typing import Annotated, Any

import structlog
from fontTools import ttLib  # type: ignore[import-untyped]
from fpdf import FPDF, FontFace
from fpdf.fonts import SubsetMap, TTFFont
from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.actions.base import (
    ActionResult,
    ActionSpec,
    NewAttachment,
    StepContext,
    ko,
    ok,
)

log = structlog.get_logger("worker.actions.pdf")

#: Regular face used when the step sets no ``font_file`` (Debian's fonts-dejavu-core path).
DEFAULT_FONT_FILE = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
#: Bold face next to it. When it is missing, bold text uses the regular face.
DEFAULT_BOLD_FONT_FILE = DEFAULT_FONT_FILE.with_name("DejaVuSans-Bold.ttf")

#: Creation date of documents whose issue date is missing or invalid, so output stays stable.
FIXED_CREATION_DATE = datetime(2000, 1, 1, tzinfo=UTC)

DEFAULT_LOCALE = "en"

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "invoice": "Invoice",
        "invoice.proforma": "Proforma invoice",
        "invoice.corrective": "Corrective invoice",
        "invoice.credit-note": "Credit note",
        "invoice.debit-note": "Debit note",
        "order": "Order",
        "delivery": "Delivery note",
        "issue_date": "Issue date",
        "op_date": "Operation date",
        "value_date": "Value date",
        "currency": "Currency",
        "exchange_rates": "Exchange rates",
        "preceding": "Preceding documents",
        "order_reference": "Order reference",
        "period": "Period",
        "supplier": "Supplier",
        "customer": "Customer",
        "tax_id": "Tax ID",
        "line_index": "#",
        "item": "Description",
        "quantity": "Quantity",
        "price": "Unit price",
        "line_sum": "Sum",
        "line_taxes": "Taxes",
        "line_total": "Total",
        "discounts": "Discounts",
        "charges": "Charges",
        "percent": "Percent",
        "amount": "Amount",
        "taxes": "Taxes",
        "tax_category": "Tax",
        "tax_rate": "Rate",
        "tax_base": "Base",
        "tax_amount": "Amount",
        "surcharge": "Surcharge",
        "retained": "retained",
        "sum": "Sum",
        "discount": "Discount",
        "charge": "Charge",
        "tax_included": "Tax included",
        "total": "Total",
        "tax": "Tax",
        "total_with_tax": "Total with tax",
        "retained_tax": "Retained tax",
        "rounding": "Rounding",
        "payable": "Payable",
        "advance": "Advance",
        "due": "Due",
        "payment_terms": "Payment terms",
        "due_dates": "Due dates",
        "payment_instructions": "Payment instructions",
        "reference": "Reference",
        "notes": "Notes",
        "page": "Page",
    },
    "es": {
        "invoice": "Factura",
        "invoice.proforma": "Factura proforma",
        "invoice.corrective": "Factura rectificativa",
        "invoice.credit-note": "Nota de crédito",
        "invoice.debit-note": "Nota de débito",
        "order": "Pedido",
        "delivery": "Albarán",
        "issue_date": "Fecha de emisión",
        "op_date": "Fecha de operación",
        "value_date": "Fecha de devengo",
        "currency": "Moneda",
        "exchange_rates": "Tipos de cambio",
        "preceding": "Documentos precedentes",
        "order_reference": "Referencia del pedido",
        "period": "Periodo",
        "supplier": "Proveedor",
        "customer": "Cliente",
        "tax_id": "Id. fiscal",
        "line_index": "#",
        "item": "Descripción",
        "quantity": "Cantidad",
        "price": "Precio unitario",
        "line_sum": "Importe",
        "line_taxes": "Impuestos",
        "line_total": "Total",
        "discounts": "Descuentos",
        "charges": "Cargos",
        "percent": "Porcentaje",
        "amount": "Importe",
        "taxes": "Impuestos",
        "tax_category": "Impuesto",
        "tax_rate": "Tipo",
        "tax_base": "Base imponible",
        "tax_amount": "Cuota",
        "surcharge": "Recargo",
        "retained": "retenido",
        "sum": "Suma",
        "discount": "Descuento",
        "charge": "Cargo",
        "tax_included": "Impuestos incluidos",
        "total": "Total",
        "tax": "Impuestos",
        "total_with_tax": "Total con impuestos",
        "retained_tax": "Retenciones",
        "rounding": "Redondeo",
        "payable": "Total a pagar",
        "advance": "Anticipo",
        "due": "Pendiente de pago",
        "payment_terms": "Condiciones de pago",
        "due_dates": "Vencimientos",
        "payment_instructions": "Forma de pago",
        "reference": "Referencia",
        "notes": "Notas",
        "page": "Página",
    },
}


class UnsupportedDocument(ValueError):
    """The document has no totals, so the layout has nothing to print."""


class FontUnavailable(ValueError):
    """The configured font file is missing or is not a usable TrueType or OpenType font."""


class PdfConfig(BaseModel):
    """Config of ``pdf``."""

    model_config = ConfigDict(extra="forbid")

    locale: Annotated[
        str | None,
        Field(
            max_length=35,
            pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*$",
            description="Language of the labels, such as en, es or es-ES. "
            "Languages other than English and Spanish get English labels",
        ),
    ] = None
    font_file: Annotated[
        str | None,
        Field(
            max_length=500,
            description="Absolute path of a .ttf or .otf file on the worker, used for all "
            f"text including bold. Default: {DEFAULT_FONT_FILE} and its bold face",
        ),
    ] = None

    @field_validator("font_file")
    @classmethod
    def _check_font_file(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value)
        if not path.is_absolute() or path.suffix.lower() not in (".ttf", ".otf"):
            raise ValueError(f"must be an absolute path to a .ttf or .otf file, not {value!r}")
        return value


# Locale and document fields


def language_of(locale: str | None) -> str:
    """Return the lower-case language part of a locale (``es`` for ``es-ES`` or ``es_MX``)."""
    if not locale:
        return DEFAULT_LOCALE
    return re.split(r"[-_]", locale, maxsplit=1)[0].lower()


def has_labels(locale: str | None) -> bool:
    """Return whether the layout has labels in the locale's language."""
    return language_of(locale) in LABELS


def labels_for(locale: str | None) -> dict[str, str]:
    """Return the labels of the locale's language, or the English labels."""
    return LABELS.get(language_of(locale), LABELS[DEFAULT_LOCALE])


def _text(value: object) -> str:
    """Return a scalar field as text, or "" for a missing, empty or structured value."""
    if value is None or isinstance(value, dict | list | bool):
        return ""
    return str(value)


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _join(parts: Iterable[object], separator: str = " ") -> str:
    return separator.join(text for text in map(_text, parts) if text)


def full_code(doc: Mapping[str, Any]) -> str:
    """Return the document's code with its series (``SERIES-CODE``), or "" without a code."""
    code = _text(doc.get("code"))
    series = _text(doc.get("series"))
    return f"{series}-{code}" if code and series else code


def document_kind(doc: Mapping[str, Any]) -> str:
    """Return the last part of the document's ``$schema`` (``invoice``, ``order``, …)."""
    return _text(doc.get("$schema")).rstrip("/").rsplit("/", 1)[-1] or "document"


def document_title(doc: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """Return the title word of the document, such as "Invoice" or "Credit note"."""
    kind = document_kind(doc)
    specific = labels.get(f"{kind}.{_text(doc.get('type'))}")
    return specific or labels.get(kind) or kind.replace("-", " ").capitalize()


def creation_date(doc: Mapping[str, Any]) -> datetime:
    """Return the issue date at midnight UTC, or a fixed date when it is missing or invalid."""
    try:
        issued = date.fromisoformat(_text(doc.get("issue_date")))
    except ValueError:
        return FIXED_CREATION_DATE
    return datetime(issued.year, issued.month, issued.day, tzinfo=UTC)


# Fonts

_FAMILY = "body"


@dataclass(frozen=True)
class _ParsedFont:
    """A font file parsed once per process, from which each document gets its own copy."""

    path: Path
    style: str
    data: bytes
    #: The parsed font, or None when it cannot be copied and each document parses it again.
    template: TTFFont | None

    def add_to(self, pdf: FPDF) -> None:
        """Make the font available on ``pdf`` as ``pdf.add_font`` would."""
        if self.template is None:
            pdf.add_font(_FAMILY, self.style, self.path)
            return
        # NOTE: this sets attributes of fpdf2 2.8's TTFFont. The test that compares a
        # render with one that uses pdf.add_font catches a change in a later fpdf2.
        # fpdf2 subsets ``ttfont`` in place when it writes the file and stores object
        # ids on ``desc``, so each document gets its own of those and its own glyph
        # records. The cmap is only read, so the copies share it.
        font = copy.copy(self.template)
        font.i = len(pdf.fonts) + 1
        font.ttfont = ttLib.TTFont(BytesIO(self.data), recalcTimestamp=False, lazy=True)
        font.desc = copy.copy(self.template.desc)
        font.cw = copy.copy(self.template.cw)
        font.glyph_ids = dict(self.template.glyph_ids)
        font.missing_glyphs = []
        font.biggest_size_pt = 0
        font._hbfont = None
        font.subset = SubsetMap(font)
        pdf.fonts[font.fontkey] = font


#: Tables that fpdf2 2.8 drops from the embedded subset anyway. Removing them once per
#: process spares each document the work of decoding them, mainly GSUB and GPOS.
_UNEMBEDDED_TABLES = (
    "FFTM", "GDEF", "GPOS", "GSUB", "MATH", "hdmx", "meta", "sbix", "CBDT",
    "CBLC", "EBDT", "EBLC", "EBSC", "SVG ", "CPAL", "COLR",
)  # fmt: skip


def _without_unembedded_tables(data: bytes) -> bytes:
    font = ttLib.TTFont(BytesIO(data), recalcTimestamp=False, lazy=True)
    # fontTools' subsetter drops the legacy kern table of fonts that also have GPOS.
    tags = (*_UNEMBEDDED_TABLES, "kern") if "GPOS" in font else _UNEMBEDDED_TABLES
    for tag in tags:
        if tag in font:
            del font[tag]
    output = BytesIO()
    font.save(output)
    return output.getvalue()


def _parse_font(path: Path, style: str) -> _ParsedFont:
    data = path.read_bytes()
    # Parsing the bytes first rejects a file that is not a font before fpdf2 opens it,
    # because fpdf2 leaves the file open when its parse fails.
    fresh = ttLib.TTFont(BytesIO(data), lazy=True)
    # fpdf2 draws a .notdef glyph into fonts that lack one, and color fonts keep a link
    # to the FPDF that loaded them. A copy made from the file bytes would miss either.
    lacks_notdef = "glyf" in fresh and ".notdef" not in fresh["glyf"]
    scratch = FPDF()
    scratch.add_font(_FAMILY, style, path)
    template = scratch.fonts[f"{_FAMILY}{style}"]
    assert isinstance(template, TTFFont)
    template.ttfont.close()
    if template.color_font is not None or lacks_notdef:
        return _ParsedFont(path, style, data, None)
    return _ParsedFont(path, style, _without_unembedded_tables(data), template)


@dataclass(frozen=True)
class _FontSet:
    regular: _ParsedFont
    bold: _ParsedFont


_font_sets: dict[tuple[Path, Path], _FontSet] = {}
_font_sets_lock = threading.Lock()


def _load_fonts(regular: Path, bold: Path) -> _FontSet:
    """Return the parsed faces, parsing each pair of files on its first use only."""
    with _font_sets_lock:
        fonts = _font_sets.get((regular, bold))
        if fonts is None:
            try:
                fonts = _FontSet(_parse_font(regular, ""), _parse_font(bold, "B"))
            except (OSError, ValueError, ttLib.TTLibError) as exc:
                raise FontUnavailable(
                    f"font file {regular} or {bold} is not a valid font ({exc}). Give a "
                    "TrueType or OpenType file in font_file, or remove font_file to use the "
                    "default font"
                ) from exc
            _font_sets[(regular, bold)] = fonts
        return fonts


@functools.cache
def _warn_default_font_missing() -> None:
    log.warning(
        "pdf.font_missing",
        path=str(DEFAULT_FONT_FILE),
        fallback="Helvetica",
        detail="characters outside Windows-1252 print as ?. Install fonts-dejavu-core",
    )


def _resolve_fonts(font_file: str | None) -> _FontSet | None:
    """Return the fonts to set text in, or None to use the core Helvetica font."""
    if font_file is not None:
        path = Path(font_file)
        if not path.is_file():
            raise FontUnavailable(
                f"font file {font_file} not found on this worker. Install it there, "
                "or remove font_file from the step config to use the default font"
            )
        return _load_fonts(path, path)
    if not DEFAULT_FONT_FILE.is_file():
        _warn_default_font_missing()
        return None
    bold = DEFAULT_BOLD_FONT_FILE if DEFAULT_BOLD_FONT_FILE.is_file() else DEFAULT_FONT_FILE
    return _load_fonts(DEFAULT_FONT_FILE, bold)


# Layout

_BODY_PT = 8.5
_LINE_MM = 4.6
_LABEL_MM = 42.0
_HEADING_STYLE = FontFace(emphasis="BOLD", fill_color=(235, 235, 235))
_BOLD = FontFace(emphasis="BOLD")


class _Page(FPDF):
    """An A4 document whose footer shows the document's code and the page number."""

    footer_text = ""

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(style="", size=7)
        self.cell(0, 4, f"{self.footer_text} {self.page_no()}/{{nb}}", align="C")


class _Layout:
    """Draws one document on a ``_Page``."""

    def __init__(
        self, pdf: _Page, doc: dict[str, Any], labels: Mapping[str, str], *, unicode: bool
    ):
        self.pdf = pdf
        self.doc = doc
        self.labels = labels
        self.unicode = unicode

    def text(self, value: object) -> str:
        """Return ``value`` as text that the current font can print."""
        text = _text(value)
        if self.unicode:
            return text
        # NOTE: without a TrueType font, text is set in the core Helvetica font, which
        # only has Windows-1252 characters. Any other character (Greek, Polish ł, …)
        # prints as "?".
        return text.encode("windows-1252", "replace").decode("windows-1252")

    def render(self) -> None:
        self.header()
        self.parties()
        self.lines()
        self.document_adjustments("discounts")
        self.document_adjustments("charges")
        self.tax_breakdown()
        self.totals()
        self.payment()
        self.notes()

    # Small drawing helpers

    def heading(self, label: str) -> None:
        self.pdf.ln(3)
        self.pdf.set_font(style="B", size=_BODY_PT + 1)
        self.pdf.cell(0, _LINE_MM + 1, self.text(label), new_x="LMARGIN", new_y="NEXT")

    def field(self, label: str, value: str) -> None:
        """Print one "label value" row, or nothing when the value is empty."""
        if not value:
            return
        pdf = self.pdf
        pdf.set_font(style="B", size=_BODY_PT)
        pdf.cell(_LABEL_MM, _LINE_MM, self.text(label))
        pdf.set_font(style="", size=_BODY_PT)
        pdf.multi_cell(0, _LINE_MM, self.text(value), new_x="LMARGIN", new_y="NEXT")

    def paragraph(self, text: str) -> None:
        """Print ``text`` across the page width, or nothing when it is empty."""
        if not text:
            return
        self.pdf.set_font(style="", size=_BODY_PT)
        self.pdf.multi_cell(0, _LINE_MM, self.text(text), new_x="LMARGIN", new_y="NEXT")

    # Sections

    def header(self) -> None:
        pdf, doc, labels = self.pdf, self.doc, self.labels
        pdf.set_font(style="B", size=16)
        title = _join([document_title(doc, labels), full_code(doc)])
        pdf.multi_cell(0, 9, self.text(title), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(1)
        self.field(labels["issue_date"], _join([doc.get("issue_date"), doc.get("issue_time")]))
        self.field(labels["op_date"], _text(doc.get("op_date")))
        self.field(labels["value_date"], _text(doc.get("value_date")))
        self.field(labels["currency"], _text(doc.get("currency")))
        rates = [
            f"1 {_text(rate.get('from'))} = {_text(rate.get('amount'))} {_text(rate.get('to'))}"
            for rate in _dicts(doc.get("exchange_rates"))
        ]
        self.field(labels["exchange_rates"], "; ".join(rates))
        preceding = [_preceding_text(item) for item in _dicts(doc.get("preceding"))]
        self.field(labels["preceding"], "; ".join(preceding))
        ordering = _dict(doc.get("ordering"))
        self.field(labels["order_reference"], _text(ordering.get("code")))
        period = _dict(ordering.get("period"))
        self.field(labels["period"], _join([period.get("start"), period.get("end")], " – "))

    def parties(self) -> None:
        pdf = self.pdf
        pdf.ln(4)
        top = pdf.get_y()
        width = (pdf.epw - 10) / 2
        bottom = self.party("supplier", pdf.l_margin, width)
        if _dict(self.doc.get("customer")):
            pdf.set_xy(pdf.l_margin + width + 10, top)
            bottom = max(bottom, self.party("customer", pdf.l_margin + width + 10, width))
        pdf.set_xy(pdf.l_margin, bottom)

    def party(self, role: str, x: float, width: float) -> float:
        """Print the supplier or customer block at ``x`` and return the y below it."""
        pdf = self.pdf
        party = _dict(self.doc.get(role))
        pdf.set_x(x)
        pdf.set_font(style="B", size=_BODY_PT - 0.5)
        pdf.cell(width, _LINE_MM, self.text(self.labels[role].upper()), new_x="LEFT", new_y="NEXT")
        pdf.set_font(style="B", size=_BODY_PT + 1)
        pdf.multi_cell(
            width, _LINE_MM + 0.6, self.text(party.get("name")), new_x="LEFT", new_y="NEXT"
        )
        pdf.set_font(style="", size=_BODY_PT)
        for line in _party_lines(party, self.labels):
            pdf.multi_cell(width, _LINE_MM, self.text(line), new_x="LEFT", new_y="NEXT")
        return pdf.get_y()

    def lines(self) -> None:
        lines = _dicts(self.doc.get("lines"))
        if not lines:
            return
        labels = self.labels
        pdf = self.pdf
        pdf.ln(5)
        pdf.set_font(style="", size=_BODY_PT)
        headings = [
            labels[key]
            for key in (
                "line_index",
                "item",
                "quantity",
                "price",
                "line_sum",
                "line_taxes",
                "line_total",
            )
        ]
        with pdf.table(
            col_widths=(6, 62, 18, 22, 22, 26, 24),
            text_align=("RIGHT", "LEFT", "RIGHT", "RIGHT", "RIGHT", "LEFT", "RIGHT"),
            headings_style=_HEADING_STYLE,
            borders_layout="HORIZONTAL_LINES",
            line_height=_LINE_MM,
            padding=(1, 1),
        ) as table:
            table.row([self.text(heading) for heading in headings])
            for line in lines:
                item = _dict(line.get("item"))
                cells = [
                    _text(line.get("i")),
                    _item_text(line, item, labels),
                    _join([line.get("quantity"), item.get("unit")]),
                    _text(item.get("price")),
                    _text(line.get("sum")),
                    "\n".join(
                        _tax_combo_text(combo, labels) for combo in _dicts(line.get("taxes"))
                    ),
                    _text(line.get("total")),
                ]
                table.row([self.text(cell) for cell in cells])

    def document_adjustments(self, key: str) -> None:
        """Print the document-level ``discounts`` or ``charges``."""
        rows = _dicts(self.doc.get(key))
        if not rows:
            return
        labels = self.labels
        self.heading(labels[key])
        self.pdf.set_font(style="", size=_BODY_PT)
        with self.pdf.table(
            col_widths=(6, 110, 30, 34),
            text_align=("RIGHT", "LEFT", "RIGHT", "RIGHT"),
            headings_style=_HEADING_STYLE,
            borders_layout="HORIZONTAL_LINES",
            line_height=_LINE_MM,
            padding=(1, 1),
        ) as table:
            headings = ["#", "", labels["percent"], labels["amount"]]
            table.row([self.text(heading) for heading in headings])
            for row in rows:
                reason = _text(row.get("reason")) or _text(row.get("key"))
                cells = [row.get("i"), reason, row.get("percent"), row.get("amount")]
                table.row([self.text(cell) for cell in cells])

    def tax_breakdown(self) -> None:
        categories = _dicts(_dict(_dict(self.doc.get("totals")).get("taxes")).get("categories"))
        if not categories:
            return
        labels = self.labels
        self.heading(labels["taxes"])
        self.pdf.set_font(style="", size=_BODY_PT)
        headings = [labels[key] for key in ("tax_category", "tax_rate", "tax_base", "tax_amount")]
        with self.pdf.table(
            col_widths=(45, 55, 40, 40),
            text_align=("LEFT", "LEFT", "RIGHT", "RIGHT"),
            headings_style=_HEADING_STYLE,
            borders_layout="HORIZONTAL_LINES",
            line_height=_LINE_MM,
            padding=(1, 1),
        ) as table:
            table.row([self.text(heading) for heading in headings])
            for category in categories:
                name = _text(category.get("code"))
                if category.get("retained") is True:
                    name = f"{name} ({labels['retained']})"
                for rate in _dicts(category.get("rates")):
                    rate_text = _join([rate.get("key"), rate.get("percent")])
                    cells = [name, rate_text, rate.get("base"), rate.get("amount")]
                    table.row([self.text(cell) for cell in cells])
                    surcharge = _dict(rate.get("surcharge"))
                    if surcharge:
                        surcharge_text = _join([labels["surcharge"], surcharge.get("percent")])
                        cells = [name, surcharge_text, rate.get("base"), surcharge.get("amount")]
                        table.row([self.text(cell) for cell in cells])

    def totals(self) -> None:
        totals = _dict(self.doc.get("totals"))
        pdf = self.pdf
        pdf.ln(4)
        pdf.set_font(style="", size=_BODY_PT + 0.5)
        with pdf.table(
            width=95,
            align="RIGHT",
            col_widths=(55, 40),
            text_align=("LEFT", "RIGHT"),
            first_row_as_headings=False,
            borders_layout="NONE",
            line_height=_LINE_MM + 0.4,
            padding=(0.5, 1),
        ) as table:
            for key in _TOTAL_KEYS:
                amount = _text(totals.get(key))
                if not amount:
                    continue
                style = _BOLD if key in ("total_with_tax", "payable") else None
                table.row([self.text(self.labels[key]), self.text(amount)], style=style)

    def payment(self) -> None:
        payment = _dict(self.doc.get("payment"))
        labels = self.labels
        terms = _dict(payment.get("terms"))
        if terms:
            self.heading(labels["payment_terms"])
            self.paragraph(_join([terms.get("key"), terms.get("detail")], ": "))
            dues = [_due_date_text(due) for due in _dicts(terms.get("due_dates"))]
            self.field(labels["due_dates"], "\n".join(dues))
            self.paragraph(_text(terms.get("notes")))
        instructions = _dict(payment.get("instructions"))
        if instructions:
            self.heading(labels["payment_instructions"])
            self.paragraph(_join([instructions.get("key"), instructions.get("detail")], ": "))
            for account in _dicts(instructions.get("credit_transfer")):
                self.paragraph(_join(_account_parts(account), ", "))
            self.field(labels["reference"], _text(instructions.get("ref")))
            self.paragraph(_text(instructions.get("notes")))

    def notes(self) -> None:
        notes = [_text(note.get("text")) for note in _dicts(self.doc.get("notes"))]
        notes = [note for note in notes if note]
        if not notes:
            return
        self.heading(self.labels["notes"])
        for note in notes:
            self.paragraph(note)


#: Totals rows in GOBL's order of calculation. Each row prints only when present.
_TOTAL_KEYS = (
    "sum",
    "discount",
    "charge",
    "tax_included",
    "total",
    "tax",
    "total_with_tax",
    "retained_tax",
    "rounding",
    "payable",
    "advance",
    "due",
)


def _party_lines(party: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    tax_id = _dict(party.get("tax_id"))
    lines = []
    if tax_id:
        lines.append(f"{labels['tax_id']}: {_join([tax_id.get('country'), tax_id.get('code')])}")
    for address in _dicts(party.get("addresses")):
        street = _join([address.get("street"), address.get("num")])
        unit = _join([address.get("block"), address.get("floor"), address.get("door")])
        lines.append(_join([street, unit], ", "))
        lines.append(_text(address.get("street_extra")))
        lines.append(_text(address.get("po_box")))
        lines.append(_join([address.get("code"), address.get("locality")]))
        lines.append(_join([address.get("region"), address.get("country")], ", "))
    lines.extend(_text(email.get("addr")) for email in _dicts(party.get("emails")))
    return [line for line in lines if line]


def _item_text(line: Mapping[str, Any], item: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """Return the item name followed by one row per line discount or charge."""
    rows = [_text(item.get("name"))]
    for key, label in (("discounts", labels["discount"]), ("charges", labels["charge"])):
        for adjustment in _dicts(line.get(key)):
            reason = _text(adjustment.get("reason")) or _text(adjustment.get("key"))
            percent = _text(adjustment.get("percent"))
            detail = _join([reason, percent and f"({percent})", adjustment.get("amount")])
            rows.append(f"{label}: {detail}")
    return "\n".join(row for row in rows if row)


def _tax_combo_text(combo: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """Return a line's tax as "VAT 21.0%", or with the rate key when it has no percent."""
    rate = _text(combo.get("percent")) or _text(combo.get("key")) or _text(combo.get("rate"))
    text = _join([combo.get("cat"), rate])
    surcharge = _text(combo.get("surcharge"))
    return f"{text} + {labels['surcharge'].lower()} {surcharge}" if surcharge else text


def _preceding_text(preceding: Mapping[str, Any]) -> str:
    issued = _text(preceding.get("issue_date"))
    return _join([full_code(preceding), issued and f"({issued})", preceding.get("reason")])


def _due_date_text(due: Mapping[str, Any]) -> str:
    percent = _text(due.get("percent"))
    return _join([due.get("date"), due.get("amount"), percent and f"({percent})"])


def _account_parts(account: Mapping[str, Any]) -> list[str]:
    iban = _text(account.get("iban"))
    bic = _text(account.get("bic"))
    number = _text(account.get("number"))
    return [
        _text(account.get("name")),
        iban and f"IBAN {iban}",
        bic and f"BIC {bic}",
        number,
    ]


def render_invoice(
    envelope: dict[str, Any], *, locale: str = DEFAULT_LOCALE, font_file: str | None = None
) -> bytes:
    """Render the envelope's document to PDF bytes.

    ``locale`` picks the labels (English for languages without labels). ``font_file``
    replaces DejaVu Sans. Without either font, the core Helvetica font is used.

    Raises:
        UnsupportedDocument: the document has no ``totals`` (payments, statuses, parties).
        FontUnavailable: ``font_file`` is missing or is not a usable font.
    """
    doc = _dict(envelope.get("doc"))
    if not _dict(doc.get("totals")):
        raise UnsupportedDocument(
            f"cannot render a {document_kind(doc)} document: the pdf action prints documents "
            "with totals (invoices, orders, deliveries)"
        )
    fonts = _resolve_fonts(font_file)
    labels = labels_for(locale)

    pdf = _Page(format="A4")
    pdf.set_margins(15, 15, 15)
    pdf.set_auto_page_break(True, margin=18)
    pdf.set_creation_date(creation_date(doc))
    if fonts is None:
        pdf.core_fonts_encoding = "windows-1252"
        pdf.set_font("Helvetica", size=_BODY_PT)
    else:
        # NOTE: text shaping is off, so Arabic, Hebrew and Indic scripts print with
        # unjoined letters, left to right. DejaVu Sans has no CJK glyphs either: fpdf2
        # leaves such characters out and logs a warning that names them.
        fonts.regular.add_to(pdf)
        fonts.bold.add_to(pdf)
        pdf.set_font(_FAMILY, size=_BODY_PT)
    layout = _Layout(pdf, doc, labels, unicode=fonts is not None)

    title = _join([document_title(doc, labels), full_code(doc)])
    pdf.set_title(layout.text(title))
    pdf.set_author(layout.text(_dict(doc.get("supplier")).get("name")))
    pdf.set_creator("transform-worker")
    pdf.set_lang(locale)
    pdf.footer_text = layout.text(f"{title} · {labels['page']}")

    pdf.add_page()
    layout.render()
    return bytes(pdf.output())


def _file_stem(name: str) -> str:
    """Return ``name`` with every character that is unsafe in a file name replaced by -."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "document"


async def render_pdf(ctx: StepContext[PdfConfig]) -> ActionResult:
    """Render the document to a PDF attached under key ``pdf`` to the job and its entry.

    Rendering runs in a worker thread, so the event loop keeps serving other jobs.
    """
    envelope = ctx.envelope
    if envelope is None:
        return ko("no-entry", "the job has no document to render")
    locale = ctx.config.locale or DEFAULT_LOCALE
    try:
        data = await asyncio.to_thread(
            render_invoice, envelope, locale=locale, font_file=ctx.config.font_file
        )
    except UnsupportedDocument as exc:
        return ko("unsupported-document", str(exc))
    except FontUnavailable as exc:
        return ko("font-unavailable", str(exc))

    doc = _dict(envelope.get("doc"))
    code = full_code(doc)
    name = f"{_file_stem(code or ctx.entry_id or 'document')}.pdf"
    message = f"rendered {name} ({len(data)} bytes)"
    if not has_labels(locale):
        message += f" with English labels, because locale {locale} has none"
    title = _join([document_title(doc, labels_for(locale)), code])
    attachment = NewAttachment(
        key="pdf",
        name=name,
        mime="application/pdf",
        data=data,
        desc=f"{title} (PDF)",
        category="pdf",
    )
    return ok(message, attachments=[attachment])


ACTIONS = [
    ActionSpec(
        "pdf",
        render_pdf,
        PdfConfig,
        "Render the document to a PDF attachment",
        # A second render replaces the attachment with the same key.
        idempotent=True,
    ),
]
