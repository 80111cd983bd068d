"""Field rules: small composable checks kept in attrs field metadata under one key.

A check takes a value and returns ``None`` when it is fine, or a message such as
``must be 1 or 2, got 3``; the path of the field is added by whoever runs it. Checks never raise, so
every problem of one object is found in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, cast

import attrs

from ..errors import ConfigError, Problem

Check = Callable[[object], "str | None"]
KEY = "kvbm_builder"

_T = TypeVar("_T")


def show(value: object) -> str:
    """A value as a message shows it: ``3``, ``'4' (str)``, ``True (bool)``."""
    if type(value) in (int, float) or value is None:
        return repr(value)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def rule(check: Check, doc: str = "") -> dict[str, Any]:
    """Field metadata carrying ``check``: ``attrs.field(metadata=rule(count(min=1)))``."""
    return {KEY: (check, doc)}


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(*, min: int | None = None, max: int | None = None) -> Check:
    """An int (never a bool, str or float) within ``[min, max]``."""

    def check(value: object) -> str | None:
        if not is_int(value):
            return f"must be an integer, got {show(value)}"
        assert isinstance(value, int)
        if min is not None and max is not None and max - min == 1 and not min <= value <= max:
            return f"must be {min} or {max}, got {value}"
        if min is not None and value < min:
            return f"must be >= {min}, got {value}"
        if max is not None and value > max:
            return f"must be <= {max}, got {value}"
        return None

    return check


def one_of(allowed: Sequence[int]) -> Check:
    """An int that is one of ``allowed``."""
    words = ", ".join(str(a) for a in allowed[:-1]) + f" or {allowed[-1]}"

    def check(value: object) -> str | None:
        if not is_int(value):
            return f"must be an integer, got {show(value)}"
        return None if value in allowed else f"must be {words}, got {value}"

    return check


def power_of_two(value: object) -> str | None:
    if not is_int(value):
        return f"must be an integer, got {show(value)}"
    assert isinstance(value, int)
    if value < 1 or value & (value - 1):
        return f"must be a power of two (1, 2, 4, ...), got {value}"
    return None


def instance(*types: type, what: str) -> Check:
    """An instance of one of ``types``; ``what`` says in words what was expected."""

    def check(value: object) -> str | None:
        if isinstance(value, types) and not (bool not in types and isinstance(value, bool)):
            return None
        return f"must be {what}, got {show(value)}"

    return check


def has_attributes(names: Collection[str], what: str) -> Check:
    """Duck typing for runtime objects (allocators, storages, event managers)."""

    def check(value: object) -> str | None:
        lacking = [n for n in names if not hasattr(value, n)]
        if lacking:
            return f"must be {what} (lacks {', '.join(lacking)}), got {show(value)}"
        return None

    return check


def optional(inner: Check) -> Check:
    def check(value: object) -> str | None:
        return None if value is None else inner(value)

    return check


def endpoint(value: object) -> str | None:
    """A ZMQ-style endpoint such as ``tcp://localhost:5557`` or ``ipc:///tmp/kv``."""
    if not isinstance(value, str):
        return f"must be an endpoint string such as 'tcp://localhost:5557', got {show(value)}"
    scheme, sep, rest = value.partition("://")
    if not sep or not scheme or not rest or any(c.isspace() for c in value):
        return f"must look like 'tcp://host:port' or 'ipc:///path', got {value!r}"
    return None


def _field_checks(cls: type) -> tuple[tuple[str, Check], ...]:
    cached: tuple[tuple[str, Check], ...] | None = cls.__dict__.get("_kvbm_checks")
    if cached is None:
        cached = tuple((f.name, f.metadata[KEY][0]) for f in attrs.fields(cast(Any, cls)) if KEY in f.metadata)
        type.__setattr__(cls, "_kvbm_checks", cached)
    return cached


class Validated:
    """Base of every config class: checks every field rule, then the class's cross-field rules.

    Subclasses set ``_kvbm_root`` (the name used in messages, e.g. ``model``) and may override
    ``_cross_check`` for rules between fields; it only sees fields that passed their own rule.
    """

    _kvbm_root: ClassVar[str] = ""

    @classmethod
    def check_values(cls, values: Mapping[str, object]) -> list[Problem]:
        """Every problem with ``values`` (a partial mapping of field names to values is fine)."""
        problems: list[Problem] = []
        good: dict[str, object] = {}
        for name, check in _field_checks(cls):
            if name not in values:
                continue
            value = values[name]
            message = check(value)
            if message is None:
                good[name] = value
            else:
                problems.append(Problem((name,), message))
        problems.extend(cls._cross_check(good, values))
        return problems

    @classmethod
    def _cross_check(cls, good: Mapping[str, object], values: Mapping[str, object]) -> list[Problem]:
        return []

    def __attrs_post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in attrs.fields(cast(Any, type(self)))}
        problems = self.check_values(values)
        if problems:
            raise ConfigError(problems, self._kvbm_root)
