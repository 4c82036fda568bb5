"""JSON exactly as the C++ (spotify-json) codecs write it, and a safe reader.

dumps: compact, keys in insertion order, strings escaped as spec 2.6 says
(short escapes for \\b \\t \\n \\f \\r, uppercase \\u00XX for the other control
bytes, everything else raw: UTF-8, '/', DEL), floats in ECMAScript style.
loads: standard JSON; every failure is a PayloadDecodeError.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal

from b0_pm.b0.errors import PayloadDecodeError

_ESCAPES = {i: f"\\u{i:04X}" for i in range(0x20)}
_ESCAPES.update({0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r",
                 ord('"'): '\\"', ord("\\"): "\\\\"})

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def dumps(obj) -> bytes:
    parts: list[str] = []
    _write(obj, parts)
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"string holds a lone surrogate and cannot be UTF-8: {exc}") from exc


def _write(obj, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append('"' + obj.translate(_ESCAPES) + '"')
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif obj is None:
        out.append("null")
    elif isinstance(obj, int):
        out.append(str(int(obj)))
    elif isinstance(obj, float):
        out.append(_ecmascript_number(obj))
    elif isinstance(obj, dict):
        out.append("{")
        for i, (key, value) in enumerate(obj.items()):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
            if i:
                out.append(",")
            out.append('"' + key.translate(_ESCAPES) + '":')
            _write(value, out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        if all(type(value) is int for value in obj):   # pid lists, the one large array sent
            out.append("[" + ",".join(map(str, obj)) + "]")
            return
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _write(value, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def _ecmascript_number(value: float) -> str:
    """Shortest round-trip digits, laid out as ECMAScript Number::toString does."""
    if not math.isfinite(value):
        raise ValueError(f"JSON cannot hold {value}")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    _, digit_tuple, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    k = len(digits)
    n = exponent + k  # the decimal point sits after n digits
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
        text = f"{mantissa}e{'+' if e > 0 else '-'}{abs(e)}"
    return sign + text


def _reject_constant(name: str):
    raise PayloadDecodeError(f"{name} is not valid JSON")


def loads(data: bytes):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadDecodeError(
            f"payload is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from exc
    try:
        result = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise PayloadDecodeError("JSON is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, and int() past the digit limit
        raise PayloadDecodeError(f"json parse error: {exc}") from exc
    if _SURROGATE_ESCAPE.search(data):
        _check_no_lone_surrogates(result)
    return result


def _check_no_lone_surrogates(obj) -> None:
    # A \uD800 escape without its pair gives a str that can never be re-encoded.
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise PayloadDecodeError("JSON string holds an unpaired surrogate escape") from exc
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
