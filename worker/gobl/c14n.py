"""GOBL canonical JSON (c14n) and the document digest built on it.

The canonical form follows the GOBL c14n rules:

- UTF-8, with no insignificant whitespace.
- Object members are sorted by the code points of their keys, and members whose value
  is ``None`` are dropped. ``None`` inside a list stays as ``null``.
- Integers that fit in a signed 64-bit integer are written plainly. Larger integers and
  all floats are written in exponent form: ``1.234E2``, ``0.0E0``, ``1.0E-7``.
- Strings escape only ``"``, ``\\`` and the control characters U+0000 to U+001F, using
  the two-character escapes where JSON has one and ``\\u00XX`` with uppercase hex
  otherwise. Every other character is written as literal UTF-8.

The input is the Python value that ``json.loads`` produces, which keeps the distinction
the canonical form needs: integer literals become ``int`` and anything with a fraction
or an exponent becomes ``float``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from decimal import Decimal

#: Containers may nest this many levels deep. Deeper input raises ``ValueError``,
#: which keeps the recursive encoder well inside Python's default recursion limit of 1000.
MAX_DEPTH = 512

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_ESCAPED = re.compile(r'["\\\x00-\x1f]')
_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def canonical_json(value: object) -> bytes:
    """Encode ``value`` as GOBL canonical JSON.

    Accepts ``dict`` with ``str`` keys, ``list``, ``tuple``, ``str``, ``int``, ``float``,
    ``bool`` and ``None``.

    Raises:
        ValueError: a float is NaN or infinite, an integer is too large for a float,
            a string contains a lone surrogate, or containers nest deeper than
            ``MAX_DEPTH``.
        TypeError: a value or an object key has an unsupported type.
    """
    try:
        simple = _plain(value, 0)
    except _NotPlain:
        parts: list[str] = []
        _write(value, parts, 0)
        return "".join(parts).encode("utf-8")
    # For plain values (no floats, no integers beyond 64 bits, no control characters
    # but the five with short escapes) the standard library's C encoder writes exactly
    # the canonical form, several times faster than the encoder below.
    return json.dumps(
        simple, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    ).encode("utf-8")


class _NotPlain(Exception):
    """The value needs the full encoder."""


#: Nesting beyond this takes the full encoder: the C encoder spends more than one
#: recursion level per nesting level and would hit Python's limit before MAX_DEPTH.
_PLAIN_MAX_DEPTH = 64

#: Control characters that ``json.dumps`` escapes differently (lowercase hex).
_OTHER_CONTROLS = re.compile(r"[\x00-\x07\x0b\x0e-\x1f\ud800-\udfff]")


def _plain(value: object, depth: int) -> object:
    """Return ``value`` with null members dropped, or raise _NotPlain."""
    if isinstance(value, str):
        if _OTHER_CONTROLS.search(value):
            raise _NotPlain
        return value
    if isinstance(value, dict):
        if depth >= _PLAIN_MAX_DEPTH:
            raise _NotPlain
        result = {}
        for key, member in value.items():
            if not isinstance(key, str) or _OTHER_CONTROLS.search(key):
                raise _NotPlain
            if member is not None:
                result[key] = _plain(member, depth + 1)
        return result
    if isinstance(value, list | tuple):
        if depth >= _PLAIN_MAX_DEPTH:
            raise _NotPlain
        return [_plain(item, depth + 1) for item in value]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX:
        return value
    raise _NotPlain


def digest(value: object) -> str:
    """Hash the canonical JSON of ``value`` with SHA-256 and return the lowercase hex digest."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def _write(value: object, parts: list[str], depth: int) -> None:
    # Containers are handled inline so that each nesting level costs one stack frame.
    if isinstance(value, dict | list | tuple):
        depth += 1
        if depth > MAX_DEPTH:
            raise ValueError(f"JSON value nests deeper than the maximum of {MAX_DEPTH} levels")

    if isinstance(value, dict):
        parts.append("{")
        first = True
        for key in sorted(_check_keys(value)):
            member = value[key]
            if member is None:
                continue
            if not first:
                parts.append(",")
            first = False
            parts.append(_encode_string(key))
            parts.append(":")
            _write(member, parts, depth)
        parts.append("}")
    elif isinstance(value, list | tuple):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _write(item, parts, depth)
        parts.append("]")
    else:
        parts.append(_encode_scalar(value))


def _check_keys(obj: dict[object, object]) -> list[str]:
    keys: list[str] = []
    for key in obj:
        if not isinstance(key, str):
            raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}")
        keys.append(key)
    return keys


def _encode_scalar(value: object) -> str:
    # bool is a subclass of int, so it is checked first.
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return _encode_int(value)
    if isinstance(value, float):
        return _encode_float(value)
    if isinstance(value, str):
        return _encode_string(value)
    raise TypeError(f"{type(value).__name__} values cannot be encoded as canonical JSON")


def _encode_int(value: int) -> str:
    if _INT64_MIN <= value <= _INT64_MAX:
        return str(int(value))
    try:
        as_float = float(value)
    except OverflowError as exc:
        raise ValueError(f"integer with {len(str(value))} digits is too large for a float") from exc
    return _encode_float(as_float)


def _encode_float(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not a valid JSON number: NaN and Infinity are not allowed")

    # repr() gives the shortest decimal string that reads back as the same float.
    shortest = Decimal(repr(float(value)))
    digits = "".join(str(d) for d in shortest.as_tuple().digits).rstrip("0")
    if not digits:
        # Zero has no significant digit to put before the point, so it has a fixed form.
        # Negative zero is written the same way.
        return "0.0E0"

    sign = "-" if shortest.is_signed() else ""
    fraction = digits[1:] or "0"
    return f"{sign}{digits[0]}.{fraction}E{shortest.adjusted()}"


def _encode_string(value: str) -> str:
    surrogate = _SURROGATE.search(value)
    if surrogate is not None:
        raise ValueError(
            f"string contains a lone surrogate U+{ord(surrogate.group()):04X} "
            f"at index {surrogate.start()}, which is not valid UTF-8"
        )
    return '"' + _ESCAPED.sub(_escape_character, value) + '"'


def _escape_character(match: re.Match[str]) -> str:
    character = match.group()
    short = _SHORT_ESCAPES.get(character)
    if short is not None:
        return short
    return f"\\u{ord(character):04X}"
