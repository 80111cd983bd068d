"""How names given as text are read (a layout, a storage kind, a NIXL mode, an event source): one reading, which the
JSON Schema's patterns say exactly.

Only ASCII text is a name: ``str.lower()`` turns some other letters into ASCII ones (the Kelvin sign into ``k``) and
``str.strip()`` takes away spaces no JSON Schema pattern knows (``\\x1c``, ``\\x85``), so reading them would accept
spellings the schema refuses. Spaces are ASCII's six (:data:`SPACES`), the same in Python and ECMA-262 patterns.
"""

from __future__ import annotations

import re

__all__ = ["SPACES", "SPACE_CLASS", "name_key", "name_pattern"]

#: The spaces a name may have around it (where its parser trims): ASCII's whitespace.
SPACES = " \t\n\r\f\v"
#: :data:`SPACES` as a regular expression class, the same in Python and ECMA-262 (JSON Schema) patterns.
SPACE_CLASS = r"[ \t\n\r\f\v]"


def name_key(value: object, *, trim: bool = False, drop: str = "", dash: bool = False) -> str | None:
    """``value`` as names are compared: lower case, ``drop``'s characters left out, with ``trim`` the spaces around
    it too, with ``dash`` ``_`` read as ``-``; None when it is not ASCII text (no name is)."""
    if not isinstance(value, str) or not str.isascii(value):  # str's own methods: a subclass's cannot run
        return None
    text = str.lower(str.strip(value, SPACES) if trim else value)
    for ch in drop:
        text = text.replace(ch, "")
    return text.replace("_", "-") if dash else text


def _letter(ch: str, style: str) -> str:
    if ch.isalpha():
        return f"[{ch.lower()}{ch.upper()}]"
    return "[-_]" if style == "trim-dash" and ch in "-_" else re.escape(ch)


def name_pattern(words: tuple[str, ...], style: str) -> str:
    """A regular expression (ECMA-262 and Python alike) matching the spellings a parser of that style accepts:
    ``words`` ignores case, ``_`` and ``-`` anywhere; ``trim`` ignores case and surrounding spaces; ``trim-dash``
    also reads ``_`` as ``-``."""
    if style == "words":
        stems = ["[-_]*".join(_letter(ch, style) for ch in word if ch not in "-_") for word in words]
        return f"^[-_]*({'|'.join(stems)})[-_]*$"
    stems = ["".join(_letter(ch, style) for ch in word) for word in words]
    return f"^{SPACE_CLASS}*({'|'.join(stems)}){SPACE_CLASS}*$"
