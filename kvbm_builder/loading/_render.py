"""Problems into words: values shown safely, unknown keys with a did-you-mean, errors as ``$.a.b: message`` lines.

Messages about a value use :func:`kvbm_builder.config._rules.show` for plain scalars, so a document and a builder
chain that get the same wrong value say the same thing; containers are shown through :mod:`reprlib`, so that a
deeply nested or huge value never makes the message itself fail.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Collection, Mapping

from ..config._rules import show
from ..errors import ConfigError, Problem

_SCALARS = (str, bytes, int, float, bool, type(None))
_MAX_DIGITS = 60  # Python refuses to print ints of more than ~4300 digits; messages stop far earlier

_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxdict = 4
_repr.maxlist = 4
_repr.maxtuple = 4
_repr.maxset = 4
_repr.maxstring = 40
_repr.maxother = 40
_repr.maxlong = _MAX_DIGITS


def show_value(value: object) -> str:
    """A value as messages show it (``'4' (str)``, ``3``, ``[[[...]]] (list)``); never fails, never long."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * _MAX_DIGITS:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, _SCALARS):
        return show(value)
    return f"{_repr.repr(value)} ({type(value).__name__})"


def key_name(key: object) -> str:
    """A key as it appears in a path; keys that are not strings (YAML allows them) are shown as values."""
    return key if isinstance(key, str) else show_value(key)


def unknown_key(key: object, allowed: Collection[str], runtime_only: Mapping[str, str]) -> Problem:
    """The problem with ``key``, which is not one of ``allowed``: a did-you-mean, or how to set a runtime object."""
    if isinstance(key, str) and key in runtime_only:
        return Problem((key,), f"cannot come from a document: {runtime_only[key]}")
    message = "unknown key"
    close = difflib.get_close_matches(key, list(allowed), n=1) if isinstance(key, str) and len(key) <= 64 else []
    if close:
        message += f"; did you mean `{close[0]}`?"
    elif allowed:
        message += "; expected one of: " + ", ".join(f"`{name}`" for name in allowed)
    else:
        message += "; this table takes no keys"
    return Problem((key_name(key),), message)


def lines(error: ConfigError, prefix: str = "") -> list[str]:
    """One line per problem, ``[prefix: ]$.path: message``, for terminals and logs."""
    lead = f"{prefix}: " if prefix else ""
    return [f"{lead}{path}: {message}" if path else f"{lead}{message}" for path, message in error.errors]
