"""The project's former pure-Python canonical JSON, kept as a test oracle for the native one.

It followed chio-core-types 0.1.2 byte for byte (checked against the kernel in tests/kernel):
RFC 8785, numbers as ECMAScript writes them, keys by UTF-16 code units, and every Unicode control
character (U+0000-U+001F and U+007F-U+009F) as ``\\u00xx``. The product canonicalizes with the
native core (``chio_receipts_native.canonical_json_of``, the kernel's own ``canonicalize``);
the tests compare the two.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Final

__all__ = ["OracleError", "canonical_json"]

_MAX_SAFE_INTEGER: Final = (1 << 53) - 1
_I64_MIN: Final = -(1 << 63)
_U64_MAX: Final = (1 << 64) - 1


class OracleError(ValueError):
    """The value has no canonical JSON form."""


_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r"}
_ESCAPES["\t"] = "\\t"
# Rust's char::is_control() is the Unicode Cc category: C0 controls, DEL and the C1 controls.
_NEEDS_ESCAPE: Final = re.compile('["\\\\\x00-\x1f\x7f-\x9f]')


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    return _ESCAPES.get(ch) or f"\\u{ord(ch):04x}"


def _string(value: str) -> str:
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, value) + '"'


def _utf16_key(key: str) -> bytes:
    # Big-endian UTF-16 bytes compare like the sequence of UTF-16 code units (RFC 8785 3.2.3).
    return key.encode("utf-16-be", "surrogatepass")


def _float(value: float) -> str:
    if not math.isfinite(value):
        raise OracleError(f"{value!r} has no JSON form (NaN and Infinity are not JSON numbers)")
    if value == 0.0:
        return "0"  # -0 too
    magnitude = abs(value)
    # repr() is the shortest decimal that round-trips, the same digits ryu gives the kernel.
    mantissa, _, exponent = repr(magnitude).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    raw = int_part + frac_part
    digits = raw.lstrip("0")
    point = len(int_part) + (int(exponent) if exponent else 0) - (len(raw) - len(digits))
    digits = digits.rstrip("0")
    sign = "-" if value < 0 else ""
    if 1e-6 <= magnitude < 1e21:
        if point <= 0:
            return f"{sign}0.{'0' * -point}{digits}"
        if point >= len(digits):
            return sign + digits + "0" * (point - len(digits))
        return f"{sign}{digits[:point]}.{digits[point:]}"
    exp = point - 1
    head = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{head}e{'+' if exp >= 0 else ''}{exp}"


def _write(value: object, out: list[str], safe_integers: bool) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        if safe_integers and abs(value) > _MAX_SAFE_INTEGER:
            raise OracleError(f"integer {value} is outside the I-JSON range +-(2**53 - 1)")
        if not _I64_MIN <= value <= _U64_MAX:
            raise OracleError(f"integer {value} does not fit a 64-bit JSON number")
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(_float(value))
    elif isinstance(value, Mapping):
        out.append("{")
        try:
            items = sorted(value.items(), key=lambda item: _utf16_key(item[0]))
        except (TypeError, AttributeError) as exc:
            raise OracleError("JSON object keys must be strings") from exc
        for index, (key, item) in enumerate(items):
            if index:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _write(item, out, safe_integers)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _write(item, out, safe_integers)
        out.append("]")
    else:
        raise OracleError(f"a {type(value).__name__} has no JSON form")


def canonical_json(value: object, *, safe_integers: bool = False) -> bytes:
    """The RFC 8785 canonical JSON bytes of ``value``, as chio-core-types 0.1.2 writes them.

    ``value`` is what :func:`json.loads` returns (dict, list, str, int, float, bool, None; tuples
    count as lists). Integers must fit a 64-bit integer, as in the kernel's ``serde_json`` values;
    ``safe_integers=True`` also rejects magnitudes above 2**53 - 1 like the kernel's strict text
    path (``canonical_json_bytes_from_str``). Raises :class:`OracleError` for NaN, Infinity,
    non-string keys, strings with lone surrogates and values that are not JSON.
    """
    out: list[str] = []
    try:
        _write(value, out, safe_integers)
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise OracleError("a string holds a lone UTF-16 surrogate, which is not JSON") from exc
    except RecursionError as exc:
        raise OracleError("the value is nested too deeply") from exc
