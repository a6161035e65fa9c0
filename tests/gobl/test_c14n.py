"""Tests for GOBL canonical JSON."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.gobl import c14n
from worker.gobl.c14n import MAX_DEPTH, canonical_json, digest


def test_vector_bytes(vector: dict[str, str]) -> None:
    assert canonical_json(json.loads(vector["input"])) == vector["canonical"].encode("utf-8")


def test_vector_sha256(vector: dict[str, str]) -> None:
    parsed = json.loads(vector["input"])
    assert digest(parsed) == vector["sha256"]
    assert hashlib.sha256(canonical_json(parsed)).hexdigest() == vector["sha256"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(123.4, b"1.234E2", id="fraction"),
        pytest.param(0.0, b"0.0E0", id="zero"),
        pytest.param(-0.0, b"0.0E0", id="negative-zero"),
        pytest.param(1e-7, b"1.0E-7", id="small"),
        pytest.param(-0.25, b"-2.5E-1", id="negative"),
        pytest.param(100.0, b"1.0E2", id="trailing-zeros"),
        pytest.param(0.1, b"1.0E-1", id="shortest-repr"),
        pytest.param(5e-324, b"5.0E-324", id="subnormal"),
        pytest.param(1.7976931348623157e308, b"1.7976931348623157E308", id="max-float"),
        pytest.param(2**63 - 1, b"9223372036854775807", id="max-int64"),
        pytest.param(-(2**63), b"-9223372036854775808", id="min-int64"),
        pytest.param(-(2**63) - 1, b"-9.223372036854776E18", id="below-int64"),
        pytest.param(2**64, b"1.8446744073709552E19", id="above-int64"),
        pytest.param(True, b"true", id="true"),
        pytest.param(False, b"false", id="false"),
        pytest.param(None, b"null", id="null"),
    ],
)
def test_scalar(value: object, expected: bytes) -> None:
    assert canonical_json(value) == expected


def test_null_member_dropped_array_null_kept() -> None:
    assert canonical_json({"a": None, "b": [None, {"c": None}]}) == b'{"b":[null,{}]}'


def test_tuple_as_array() -> None:
    assert canonical_json((1, "a")) == b'[1,"a"]'


def test_control_characters_uppercase_hex() -> None:
    assert canonical_json("\x00\x0b\x1f\x7f") == b'"\\u0000\\u000B\\u001F\x7f"'


def test_keys_escaped() -> None:
    assert canonical_json({'a"\n': 1}) == b'{"a\\"\\n":1}'


def test_astral_key_order() -> None:
    # U+1F600 sorts after U+FFFD by code point, although its UTF-16 form would sort first.
    assert canonical_json({"😀": 1, "\ufffd": 2}) == '{"\ufffd":2,"😀":1}'.encode()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected(value: float) -> None:
    with pytest.raises(ValueError, match="NaN and Infinity are not allowed"):
        canonical_json({"n": value})


def test_huge_int_rejected() -> None:
    with pytest.raises(ValueError, match="too large for a float"):
        canonical_json(10**400)


def test_lone_surrogate_rejected() -> None:
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at index 1"):
        canonical_json(json.loads('"a\\ud800"'))


def test_lone_surrogate_key_rejected() -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        canonical_json({"\udfff": 1})


def test_surrogate_pair_accepted() -> None:
    assert canonical_json(json.loads('"\\ud83e\\udd29"')) == '"🤩"'.encode()


def test_non_string_key_rejected() -> None:
    with pytest.raises(TypeError, match="keys must be strings, not int"):
        canonical_json({1: "a"})


def test_unsupported_type_rejected() -> None:
    with pytest.raises(TypeError, match="set values cannot be encoded"):
        canonical_json({"s": {1}})


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_depth_at_limit() -> None:
    assert canonical_json(nested(MAX_DEPTH)) == b"[" * MAX_DEPTH + b"]" * MAX_DEPTH


def test_depth_over_limit() -> None:
    with pytest.raises(ValueError, match="deeper than the maximum of 512 levels"):
        canonical_json(nested(MAX_DEPTH + 1))


def test_depth_far_over_limit() -> None:
    with pytest.raises(ValueError, match="deeper than the maximum"):
        canonical_json(nested(100_000))


def test_digest_lowercase_hex() -> None:
    value = digest({"a": 1})
    assert value == hashlib.sha256(b'{"a":1}').hexdigest()
    assert value == value.lower()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_fast_path_matches_full_encoder(value: object) -> None:
    parts: list[str] = []
    try:
        c14n._write(value, parts, 0)
    except ValueError:
        return
    assert canonical_json(value) == "".join(parts).encode("utf-8")
