"""Byte sizes, parsed exactly (``Fraction``, never float rounding), and the facts every layer shares about them.

GB means 10^9 bytes and GiB 2^30 bytes, never mixed up. Upstream sizes tiers with decimal GB.
"""

from __future__ import annotations

import re
from fractions import Fraction

from ..errors import ConfigError, Problem, show
from .names import SPACE_CLASS

GB = 10**9
GiB = 2**30

#: The most bytes one allocation, one file and one tier may span: the C calls take signed 64-bit sizes and offsets.
MAX_BYTES = 2**63 - 1

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
#: A plain non-negative decimal number: ``4``, ``0.5``, ``.75``, ``1e3``.
NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?"
#: A size as text: a number, then a unit (B, KB..TB, KiB..TiB, any case), ASCII spaces allowed around each.
SIZE_PATTERN = rf"^{SPACE_CLASS}*{NUMBER}{SPACE_CLASS}*([kKmMgGtT][iI]?[bB]|[bB])?{SPACE_CLASS}*$"
_SIZE = re.compile(rf"^{SPACE_CLASS}*{NUMBER}{SPACE_CLASS}*([A-Za-z]*){SPACE_CLASS}*$")
_NUMBER = re.compile(NUMBER)

# Past these, text is no size anyone means, and exact arithmetic on it could take minutes (1e999999999)
# or raise ValueError (Python refuses int() of more than 4300 digits).
_MAX_DIGITS = 64
_MAX_EXPONENT = 64


def align_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value`` (an alignment, a page, a disk block)."""
    return -(-value // multiple) * multiple


def parse_number(text: str) -> Fraction | None:
    """A plain non-negative decimal number (``4``, ``0.5``, ``1e3``; no spaces) as an exact Fraction, else None."""
    match = _NUMBER.fullmatch(text)
    return None if match is None else _fraction(match.group(1), match.group(2))


def _fraction(mantissa: str, exponent: str | None) -> Fraction | None:
    if len(mantissa) > _MAX_DIGITS or (exponent and (len(exponent) > 4 or abs(int(exponent)) > _MAX_EXPONENT)):
        return None
    value = Fraction(mantissa)
    if exponent:
        value *= Fraction(10) ** int(exponent)
    return value


def _error(message: str) -> ConfigError:
    return ConfigError([Problem((), message)])


def parse_size(value: object) -> int:
    """``"16GiB"``, ``"16 GB"``, ``"512MiB"``, ``17179869184`` -> bytes. Raises ConfigError otherwise."""
    if isinstance(value, bool):
        raise _error(f"{value!r} is not a size; write e.g. '16GiB' or '16GB'")
    if isinstance(value, int):
        if value < 0:
            raise _error(f"a size cannot be negative, got {show(value)}")
        return value
    if not isinstance(value, str):
        raise _error(f"must be a size such as '16GiB' or a byte count, got {show(value)}")
    match = _SIZE.match(value)
    if match is not None:
        whole, exponent, unit_text = match.groups()
        unit = _UNITS.get(unit_text.lower())
        if unit is not None and exponent is None and whole.isdigit() and len(whole) <= _MAX_DIGITS:
            return int(whole) * unit  # the usual "16GiB": exact without Fraction, which is slow
        number = _fraction(whole, exponent)
        if unit is not None and number is not None:
            nbytes = number * unit
            if nbytes.denominator != 1:
                raise _error(f"{show(value, typed=False)} is not a whole number of bytes")
            return int(nbytes)
    raise _error(f"{show(value, typed=False)} is not a size; write e.g. '16GiB' (2^30 bytes) or '16GB' (10^9 bytes)")


def format_bytes(nbytes: int) -> str:
    """``4096`` -> ``4096 bytes``, ``3145728`` -> ``3.0 MiB``, ``17179869184`` -> ``16.00 GiB (17.18 GB)``."""
    if nbytes >= GiB:
        return f"{nbytes / GiB:.2f} GiB ({nbytes / GB:.2f} GB)"
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes} bytes"
