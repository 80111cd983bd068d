"""Byte sizes and positive numbers, parsed exactly (``Fraction``, never float rounding).

GB means 10^9 bytes and GiB 2^30 bytes, never mixed up. Upstream sizes tiers with decimal GB.
"""

from __future__ import annotations

import re
from fractions import Fraction

from ..errors import ConfigError, Problem
from ._rules import show

GB = 10**9
GiB = 2**30

#: The most bytes one memory allocation or file can span (a signed 64-bit offset): a tier bigger than this is refused.
MAX_SPAN_BYTES = 2**63 - 1

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
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([A-Za-z]*)\s*$")


# Past these, text is no size anyone means, and exact arithmetic on it could take minutes (1e999999999)
# or raise ValueError (Python refuses int() of more than 4300 digits).
_MAX_DIGITS = 64
_MAX_EXPONENT = 64


def parse_number(text: str) -> Fraction | None:
    """A plain non-negative decimal number (``4``, ``0.5``, ``1e3``) as an exact Fraction, else None."""
    match = _SIZE.match(text)
    if match is None or match.group(3):
        return None
    return _fraction(match)


def _fraction(match: re.Match[str]) -> Fraction | None:
    mantissa, exponent = match.group(1), match.group(2)
    if len(mantissa) > _MAX_DIGITS or (exponent and (len(exponent) > 4 or abs(int(exponent)) > _MAX_EXPONENT)):
        return None
    value = Fraction(mantissa)
    if exponent:
        value *= Fraction(10) ** int(exponent)
    return value


def _clip(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def parse_size(value: object) -> int:
    """``"16GiB"``, ``"16 GB"``, ``"512MiB"``, ``17179869184`` -> bytes. Raises ConfigError otherwise."""
    if isinstance(value, bool):
        raise ConfigError([Problem((), f"{value!r} is not a size; write e.g. '16GiB' or '16GB'")])
    if isinstance(value, int):
        if value < 0:
            raise ConfigError([Problem((), f"a size cannot be negative, got {show(value)}")])
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is not None:
            unit = _UNITS.get(match.group(3).lower())
            whole = match.group(1)
            if unit is not None and match.group(2) is None and whole.isdigit() and len(whole) <= _MAX_DIGITS:
                return int(whole) * unit  # the usual "16GiB": exact without Fraction, which is slow
            number = _fraction(match)
            if unit is not None and number is not None:
                nbytes = number * unit
                if nbytes.denominator != 1:
                    raise ConfigError([Problem((), f"{_clip(value)} is not a whole number of bytes")])
                return int(nbytes)
        raise ConfigError(
            [Problem((), f"{_clip(value)} is not a size; write e.g. '16GiB' (2^30 bytes) or '16GB' (10^9 bytes)")]
        )
    raise ConfigError([Problem((), f"must be a size such as '16GiB' or a byte count, got {type(value).__name__}")])


def format_bytes(nbytes: int) -> str:
    """``17179869184`` -> ``16.00 GiB (17.18 GB)``."""
    return f"{nbytes / GiB:.2f} GiB ({nbytes / GB:.2f} GB)"


def blocks_from_gb(gb: Fraction | int, bytes_per_block: int) -> int:
    """Upstream's rule: ``floor(GB * 1e9 / bytes_per_block)``, computed exactly."""
    return int(Fraction(gb) * GB // bytes_per_block)
