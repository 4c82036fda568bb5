"""jsoncodec: byte-exact C++ (spotify-json) output and a reader that never crashes."""

import json

import pytest
from hypothesis import given, strategies as st

from b0_pm.b0 import jsoncodec
from b0_pm.b0.errors import PayloadDecodeError


def test_compact_and_in_insertion_order():
    obj = {"zeta": 1, "alpha": [True, False, None], "mid": {}, "list": [], "neg": -42}
    assert jsoncodec.dumps(obj) == b'{"zeta":1,"alpha":[true,false,null],"mid":{},"list":[],"neg":-42}'


@pytest.mark.parametrize("text, expected", [
    ('"', b'"\\""'),
    ("\\", b'"\\\\"'),
    ("\b\t\n\f\r", b'"\\b\\t\\n\\f\\r"'),
    ("\x00\x01\x0b\x1f", b'"\\u0000\\u0001\\u000B\\u001F"'),
    ("\x1a\x1e", b'"\\u001A\\u001E"'),
    ("/path/x", b'"/path/x"'),
    ("\x7f", b'"\x7f"'),
    ("caf\u00e9 \u2603 \U0001F600", '"caf\u00e9 \u2603 \U0001F600"'.encode("utf-8")),
    ("\u2028\u2029", '"\u2028\u2029"'.encode("utf-8")),
])
def test_string_escapes_match_cpp(text, expected):
    assert jsoncodec.dumps(text) == expected


def test_keys_are_escaped_too():
    assert jsoncodec.dumps({"a\nb": 1}) == b'{"a\\nb":1}'


@pytest.mark.parametrize("value, expected", [
    (0.5199999809265137, b"0.5199999809265137"),
    (1.0, b"1"),
    (-2.5, b"-2.5"),
    (0.0, b"0"),
    (1e21, b"1e+21"),
    (1e20, b"100000000000000000000"),
    (1.5e-7, b"1.5e-7"),
    (0.000001, b"0.000001"),
    (123456.789, b"123456.789"),
])
def test_floats_in_ecmascript_form(value, expected):
    assert jsoncodec.dumps(value) == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), object(), {1: 2}, b"bytes"])
def test_unencodable_values_raise(bad):
    with pytest.raises((TypeError, ValueError)):
        jsoncodec.dumps(bad)


def test_loads_accepts_whitespace_and_trailing_newline():
    assert jsoncodec.loads(b' {\n  "a" : [1, 2]\n}\n') == {"a": [1, 2]}


@pytest.mark.parametrize("data", [
    b"", b"{", b'{"a":1} x', b"NaN", b'{"a":Infinity}', b"-Infinity", b"{'a':1}",
    b'{"a":1}{"b":2}', b"\xff\xfe{}", b'{"a":"\xc3"}', b'"\xed\xa0\x80"',
    b'"\\ud800"', b'{"k":["\\udc00"]}', b"1" * 5000, b"\xef\xbb\xbf{}",
])
def test_loads_rejects_bad_input_with_payload_error(data):
    with pytest.raises(PayloadDecodeError) as info:
        jsoncodec.loads(data)
    assert str(info.value)


def test_loads_survives_deep_nesting():
    with pytest.raises(PayloadDecodeError, match="nested too deeply"):
        jsoncodec.loads(b"[" * 200000 + b"]" * 200000)


def test_surrogate_pairs_decode():
    assert jsoncodec.loads(b'"\\ud83d\\ude00"') == "\U0001F600"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(json_values)
def test_round_trip_and_agreement_with_stdlib(value):
    data = jsoncodec.dumps(value)
    assert jsoncodec.loads(data) == value
    assert json.loads(data.decode("utf-8")) == value
    # Only the \u00XX hex case differs from the stdlib's compact non-ASCII output.
    stdlib = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert data.decode("utf-8").lower() == stdlib.lower()


@given(st.binary(max_size=64))
def test_loads_never_raises_anything_but_payload_errors(data):
    try:
        jsoncodec.loads(data)
    except PayloadDecodeError:
        pass
