"""The builder machinery every config reuses: derive_builder's owned pattern, in Python.

- each setter stores its value and returns the builder, so calls chain;
- ``build()`` consumes the builder (using it afterwards raises :class:`BuilderConsumedError`);
  ``clone()`` first to keep a template;
- ``_validate`` is the ``build_fn(validate = ...)`` hook; it runs first and sees which setters were called;
- a required field left unset gives :class:`UninitializedFieldError`
  (`` `<field>` must be initialized ``, first missing in declaration order);
- every problem found in one ``build()`` is reported together, in one error.

A setter only records its value; what the value may be (its rule, its normalisation, the names it may be given
by) is the config field's, so ``build()``, direct construction and ``attrs.evolve`` judge alike.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, ClassVar, Generic, TypeVar, cast

import attrs

from ..errors import MUST_BE_INITIALIZED, BuilderConsumedError, ConfigError, Problem, UninitializedFieldError, show
from .fields import Validated

T = TypeVar("T", bound=Validated)
B = TypeVar("B", bound="Builder[Any]")


class Builder(Generic[T]):
    """Base of every ``XxxBuilder``. Subclasses set ``_target`` and write one typed setter per field."""

    _target: ClassVar[type[Validated]]
    _hooked: ClassVar[bool] = False  # whether the subclass has a build_fn(validate) hook
    _required: ClassVar[tuple[str, ...]] = ()  # the target's fields without a default, in declaration order
    _required_set: ClassVar[frozenset[str]] = frozenset()
    _fields: ClassVar[frozenset[str]] = frozenset()
    __slots__ = ("_consumed", "_rejected", "_values")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._hooked = cls._validate is not Builder._validate
        fields = attrs.fields(cast(Any, cls._target))
        cls._required = tuple(f.name for f in fields if f.default is attrs.NOTHING)
        cls._required_set = frozenset(cls._required)
        cls._fields = frozenset(f.name for f in fields)

    def __init__(self) -> None:
        self._values: dict[str, object] = {}
        self._rejected: dict[str, str | None] = {}
        self._consumed = False

    def _set(self: B, name: str, value: object) -> B:
        if self._consumed:
            self._live(f"setting `{name}`")
        self._values[name] = value
        if self._rejected:
            self._rejected.pop(name, None)
        return self

    def _reject(self: B, name: str, message: str | None) -> B:
        """A custom setter got input it cannot use: counted as set, reported at ``build()`` (``None``: already
        reported elsewhere, nothing more to say)."""
        if self._consumed:
            self._live(f"setting `{name}`")
        self._values.pop(name, None)
        self._rejected[name] = message
        return self

    def mark_invalid(self: B, name: str) -> B:
        """Count field ``name`` as set with a value that was already reported as invalid elsewhere (a loader does
        this for a value it could not read), so that ``build()`` says nothing more about it."""
        return self._reject(name, None)

    def _live(self, doing: str) -> None:
        if self._consumed:
            raise BuilderConsumedError(
                f"{type(self).__name__} was consumed by build(); {doing} on it does nothing useful. "
                "Call .clone() before build() to keep a builder as a template."
            )

    def set(self: B, name: str, value: object) -> B:
        """Set field ``name`` to ``value`` as its plain setter does: for code that holds field names (the loader)."""
        if not isinstance(name, str) or name not in self._fields:
            shown = name if isinstance(name, str) and name.isidentifier() else show(name, typed=False)
            raise ConfigError(
                [Problem((shown,), f"is not a field of {self._target.__name__}")], self._target._kvbm_root
            )
        return self._set(name, value)

    def is_set(self, name: str) -> bool:
        """Whether the setter of ``name`` was called (even with ``None``). Like any use, refused once consumed."""
        if self._consumed:
            self._live(f"asking is_set({show(name, typed=False)})")
        return self._chosen(name)

    def _chosen(self, name: str) -> bool:
        return name in self._values or name in self._rejected

    def clone(self: B) -> B:
        """An independent copy (values are shallow-copied), e.g. one model builder per tier.
        ``copy.copy`` and ``copy.deepcopy`` of a builder are clones too."""
        self._live("calling clone()")
        twin = object.__new__(type(self))
        twin._values = dict(self._values)
        twin._rejected = dict(self._rejected)
        twin._consumed = False
        return twin

    def __copy__(self: B) -> B:
        return self.clone()

    def __deepcopy__(self: B, memo: dict[int, Any]) -> B:
        return self.clone()

    def _validate(self) -> list[Problem]:
        """The build_fn(validate) hook; runs before the missing-field check."""
        return []

    def build(self) -> T:
        """Validate everything and return the frozen config. Consumes the builder."""
        if self._consumed:
            self._live("calling build()")
        self._consumed = True
        target = self._target
        values = self._values  # no copy: nothing can touch a consumed builder
        rejected = self._rejected
        problems = self._validate() if self._hooked else []
        # Upstream's order: a failing validate hook is reported before a missing field. Only the hook counts:
        # a value a custom setter refused is one more problem, not a hook failure.
        hook_failed = bool(problems)
        if rejected:
            problems.extend(Problem((name,), message) for name, message in rejected.items() if message is not None)
            # a refused value is still a choice made: a stand-in takes its place, and nothing is said about it twice
            values = {**values, **dict.fromkeys(rejected, _REFUSED)}
        root = target._kvbm_root
        if not values.keys() >= self._required_set:  # a set operation, in C: the usual case costs nothing
            missing = [name for name in self._required if name not in values]
            problems.extend(Problem((name,), MUST_BE_INITIALIZED) for name in missing)
            # the hook and the class may both see an exclusive choice: say it once (a failed hook speaks for the
            # object as a whole, as below)
            checked = target.check_values(values)
            problems = _merged(problems, [p for p in checked if p.path] if hook_failed else checked, rejected)
            if hook_failed:
                raise ConfigError(problems, root)
            raise UninitializedFieldError(problems, root, missing)
        try:
            built = target(**values)
        except ConfigError as err:
            # a failed hook speaks for the object as a whole (upstream's exclusive choice): say it once
            more = [p for p in err.problems if p.path] if hook_failed else err.problems
            raise ConfigError(_merged(problems, more, rejected), root) from None
        if problems:
            raise ConfigError(problems, root)
        return built  # type: ignore[return-value]

    def __repr__(self) -> str:
        # bounded, and never failing: a value may be a caller's object whose __repr__ raises, or a huge integer
        state = (
            "consumed" if self._consumed else ", ".join(f"{k}={show(v, typed=False)}" for k, v in self._values.items())
        )
        return f"{type(self).__name__}({state})"


class _Refused:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<refused>"


_REFUSED = _Refused()


def _merged(first: list[Problem], more: Iterable[Problem], refused: Collection[str]) -> list[Problem]:
    """``first`` and then ``more``, each problem once, leaving out what ``more`` says of refused values."""
    kept = (p for p in more if not (p.path and p.path[0] in refused))
    return list(dict.fromkeys([*first, *kept]))
