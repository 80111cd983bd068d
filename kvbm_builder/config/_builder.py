"""The builder machinery every config reuses: derive_builder's owned pattern, in Python.

- each setter stores its value and returns the builder, so calls chain;
- ``build()`` consumes the builder (using it afterwards raises :class:`BuilderConsumedError`);
  ``clone()`` first to keep a template;
- ``_validate`` is the ``build_fn(validate = ...)`` hook; it runs first and sees which setters were called;
- a required field left unset gives :class:`UninitializedFieldError`
  (`` `<field>` must be initialized ``, first missing in declaration order);
- every problem found in one ``build()`` is reported together, in one error.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Generic, TypeVar

from ..errors import BuilderConsumedError, ConfigError, Problem, UninitializedFieldError
from ._rules import Validated, plan

T = TypeVar("T", bound=Validated)
B = TypeVar("B", bound="Builder[Any]")


class Builder(Generic[T]):
    """Base of every ``XxxBuilder``. Subclasses set ``_target`` and write one typed setter per field."""

    _target: ClassVar[type[Validated]]
    _hooked: ClassVar[bool] = False  # whether the subclass has a build_fn(validate) hook
    __slots__ = ("_consumed", "_rejected", "_values")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._hooked = cls._validate is not Builder._validate

    def __init__(self) -> None:
        self._values: dict[str, object] = {}
        self._rejected: dict[str, str] = {}
        self._consumed = False

    def _set(self: B, name: str, value: object) -> B:
        if self._consumed:
            self._live(f"setting `{name}`")
        self._values[name] = value
        if self._rejected:
            self._rejected.pop(name, None)
        return self

    def _reject(self: B, name: str, message: str) -> B:
        """A custom setter got input it cannot use: counted as set, reported at ``build()``."""
        if self._consumed:
            self._live(f"setting `{name}`")
        self._values.pop(name, None)
        self._rejected[name] = message
        return self

    def _live(self, doing: str) -> None:
        if self._consumed:
            raise BuilderConsumedError(
                f"{type(self).__name__} was consumed by build(); {doing} on it does nothing useful. "
                "Call .clone() before build() to keep a builder as a template."
            )

    def is_set(self, name: str) -> bool:
        """Whether the setter of ``name`` was called (even with ``None``). Like any use, refused once consumed."""
        if self._consumed:
            self._live(f"asking is_set({name!r})")
        return name in self._values or name in self._rejected

    def clone(self: B) -> B:
        """An independent copy (values are shallow-copied), e.g. one model builder per tier."""
        self._live("calling clone()")
        twin = copy.copy(self)
        twin._values = dict(self._values)
        twin._rejected = dict(self._rejected)
        twin._consumed = False
        return twin

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
            problems.extend(Problem((name,), message) for name, message in rejected.items())
        required = (target.__dict__.get("_kvbm_plan") or plan(target)).required
        missing = [name for name in required if name not in values and name not in rejected]
        if missing:
            problems.extend(Problem((name,), "must be initialized") for name in missing)
            # the hook and the class may both see an exclusive choice: say it once
            problems = list(dict.fromkeys([*problems, *target.check_values(values)]))
            root = target._kvbm_root
            if hook_failed:
                raise ConfigError(problems, root)
            raise UninitializedFieldError(problems, root, missing)
        try:
            built = target(**values)
        except ConfigError as err:
            raise ConfigError(dict.fromkeys([*problems, *err.problems]), target._kvbm_root) from None
        if problems:
            raise ConfigError(problems, target._kvbm_root)
        return built  # type: ignore[return-value]

    def __repr__(self) -> str:
        state = "consumed" if self._consumed else ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"{type(self).__name__}({state})"
