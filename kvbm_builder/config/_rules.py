"""Field rules: small composable checks kept in attrs field metadata under one key.

A check takes a value and returns ``None`` when it is fine, or a message such as
``must be 1 or 2, got 3``; the path of the field is added by whoever runs it. Checks never raise, so
every problem of one object is found in one pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, cast

import attrs

from ..errors import ConfigError, Problem

Check = Callable[[object], "str | None"]
KEY = "kvbm_builder"

_T = TypeVar("_T")


def show(value: object) -> str:
    """A value as a message shows it: ``3``, ``'4' (str)``, ``True (bool)``."""
    if isinstance(value, int) and value.bit_length() > 192:
        # repr() of an int past 4300 digits raises ValueError, and a message must never raise
        return f"{'a negative' if value < 0 else 'an'} integer of {value.bit_length()} bits ({type(value).__name__})"
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

    # hot path (every build() runs it): one type test and two comparisons for an in-range int
    lo = -math.inf if min is None else min
    hi = math.inf if max is None else max

    def check(value: object) -> str | None:
        if type(value) is int or is_int(value):
            if lo <= value <= hi:  # type: ignore[operator]
                return None
            assert isinstance(value, int)
            if min is not None and max is not None and max - min == 1:
                return f"must be {min} or {max}, got {show(value)}"
            if min is not None and value < min:
                return f"must be >= {min}, got {show(value)}"
            return f"must be <= {max}, got {show(value)}"
        return f"must be an integer, got {show(value)}"

    return check


def one_of(allowed: Sequence[int]) -> Check:
    """An int that is one of ``allowed``."""
    words = ", ".join(str(a) for a in allowed[:-1]) + f" or {allowed[-1]}"

    def check(value: object) -> str | None:
        if type(value) is int and value in allowed:
            return None
        if not is_int(value):
            return f"must be an integer, got {show(value)}"
        return None if value in allowed else f"must be {words}, got {show(value)}"

    return check


def power_of_two(value: object) -> str | None:
    if type(value) is int and value > 0 and not value & (value - 1):
        return None
    if not is_int(value):
        return f"must be an integer, got {show(value)}"
    assert isinstance(value, int)
    if value < 1 or value & (value - 1):
        return f"must be a power of two (1, 2, 4, ...), got {show(value)}"
    return None


def instance(*types: type, what: str) -> Check:
    """An instance of one of ``types``; ``what`` says in words what was expected."""

    bool_ok = bool in types

    def check(value: object) -> str | None:
        if isinstance(value, types) and (bool_ok or not isinstance(value, bool)):
            return None
        return f"must be {what}, got {show(value)}"

    return check


def has_attributes(names: Collection[str], what: str) -> Check:
    """Duck typing for runtime objects (allocators, storages, event managers)."""

    names = tuple(names)

    def check(value: object) -> str | None:
        for name in names:
            if not hasattr(value, name):
                lacking = ", ".join(n for n in names if not hasattr(value, n))
                return f"must be {what} (lacks {lacking}), got {show(value)}"
        return None

    return check


def optional(inner: Check) -> Check:
    def check(value: object) -> str | None:
        return None if value is None else inner(value)

    return check


_SPACE = re.compile(r"\s")


def endpoint(value: object) -> str | None:
    """A ZMQ-style endpoint such as ``tcp://localhost:5557`` or ``ipc:///tmp/kv``."""
    if not isinstance(value, str):
        return f"must be an endpoint string such as 'tcp://localhost:5557', got {show(value)}"
    scheme, sep, rest = value.partition("://")
    if not sep or not scheme or not rest or _SPACE.search(value):
        return f"must look like 'tcp://host:port' or 'ipc:///path', got {value!r}"
    return None


@attrs.frozen
class _Plan:
    """What validating one class takes, worked out once per class."""

    checks: tuple[tuple[str, Check], ...]
    names: tuple[str, ...]  # every attrs field, in declaration order
    required: tuple[str, ...]  # fields without a default, in declaration order


def plan(cls: type) -> _Plan:
    """The cached validation plan of a config class."""
    cached: _Plan | None = cls.__dict__.get("_kvbm_plan")
    if cached is None:
        fields = attrs.fields(cast(Any, cls))
        cached = _Plan(
            checks=tuple((f.name, f.metadata[KEY][0]) for f in fields if KEY in f.metadata),
            names=tuple(f.name for f in fields),
            required=tuple(f.name for f in fields if f.default is attrs.NOTHING),
        )
        type.__setattr__(cls, "_kvbm_plan", cached)
    return cached


def _compile_post_init(cls: type) -> Callable[[Any], None]:
    """``cls``'s own ``__attrs_post_init__``: every rule as one straight-line test, as attrs writes ``__init__``.

    Every build() runs it; a loop over the plan with ``getattr`` costs about twice as much. It only decides
    whether all is well; when not, :meth:`Validated.check_values` runs and finds every problem with its message.
    A subclass that inherits it compiles its own on first use (the ``type(self) is _cls`` test).
    """
    p = plan(cls)
    namespace: dict[str, Any] = {f"_check{i}": check for i, (_, check) in enumerate(p.checks)}
    namespace.update(_cls=cls, _report=_report, _generic=_generic_post_init)
    tests = " and ".join(f"_check{i}(self.{name}) is None" for i, (name, _) in enumerate(p.checks)) or "True"
    lines = [
        "def __attrs_post_init__(self):",
        "    if type(self) is not _cls:",
        "        return _generic(self)",
        f"    if not ({tests}):",
        "        return _report(self)",
    ]
    if cast(Any, cls)._cross_check.__func__ is not cast(Any, Validated)._cross_check.__func__:
        values = ", ".join(f"{name!r}: self.{name}" for name in p.names)
        good = ", ".join(f"{name!r}: self.{name}" for name, _ in p.checks)
        lines += [f"    if _cls._cross_check({{{good}}}, {{{values}}}):", "        return _report(self)"]
    exec("\n".join(lines), namespace)
    return cast(Callable[[Any], None], namespace["__attrs_post_init__"])


def _report(obj: Validated) -> None:
    problems = obj.check_values({name: getattr(obj, name) for name in plan(type(obj)).names})
    if problems:
        raise ConfigError(problems, obj._kvbm_root)


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
        for name, check in plan(cls).checks:
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
        # First instance of a class: compile the class's own check and install it, so attrs' __init__ calls
        # it directly from now on. A class that writes its own __attrs_post_init__ (and calls super()) keeps
        # it, and gets the compiled check from the cache instead.
        cls = type(self)
        post_init: Callable[[Any], None] | None = cls.__dict__.get("_kvbm_post_init")
        if post_init is None:
            post_init = _compile_post_init(cls)
            type.__setattr__(cls, "_kvbm_post_init", post_init)
            if "__attrs_post_init__" not in cls.__dict__:
                type.__setattr__(cls, "__attrs_post_init__", post_init)
        post_init(self)


_generic_post_init = Validated.__attrs_post_init__
