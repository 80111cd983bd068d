"""How a config field is described: once, on the attrs field, in metadata under one key (as environ-config does).

A field says its type (the annotation), its default, its rule, its doc, the ``DYN_KVBM_*`` variable that sets it
and whether a document can hold it; everything else is derived from that: the checks every construction runs, the
builders' ``build()``, the loader's structure hooks, the JSON Schema, ``show --sources`` and the environment::

    num_layers: int = field(rule=integer(min=1, max=U64_MAX), doc="Attention layers of the model.")

A rule is a :class:`Rule`: a check that returns ``None`` when a value is fine or a message such as
``must be 1 or 2, got 3`` (the path is added by whoever runs it; a check never raises, so every problem of one
object is found in one pass), and the JSON Schema facets of what it accepts.
"""

from __future__ import annotations

import builtins
import math
import operator
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, cast

import attrs

from ..errors import ConfigError, Problem, RuntimeObjectError, show
from .env import EnvVar

__all__ = [
    "KEY",
    "U64_MAX",
    "Check",
    "Rule",
    "Spec",
    "Validated",
    "duck",
    "endpoint",
    "field",
    "instance",
    "integer",
    "is_int",
    "one_of",
    "optional",
    "power_of_two",
    "same_as",
    "spec_of",
    "specs",
    "spelled",
    "true_or_false",
]

KEY = "kvbm"
U64_MAX = 2**64 - 1  # upstream's u64 and usize
Check = Callable[[object], "str | None"]
_T = TypeVar("_T")


@attrs.frozen
class Rule:
    """A check and the JSON Schema facets of the values it accepts (``{"type": "integer", "minimum": 1}``).

    ``plain``: the field keeps an int or str of a subclass (an ``IntEnum``, a caller's ``str`` subclass) as the plain
    int or str it holds, so that a config holds only plain data and no method of the caller's class runs later."""

    check: Check
    schema: Mapping[str, Any] = attrs.field(factory=dict)
    plain: bool = False

    def __call__(self, value: object) -> str | None:
        return self.check(value)


@attrs.frozen
class Spec:
    """Everything said about one field besides its type and default.

    ``document``: whether a document can hold the value; a runtime object (a token, a registry, memory given as
    storage, a filter) cannot, and is set in Python. ``env``: the ``DYN_KVBM_*`` variable that sets it.
    """

    rule: Rule | None
    doc: str
    env: tuple[EnvVar, ...] = ()
    document: bool = True


def field(
    *,
    doc: str,
    rule: Rule | None = None,
    default: Any = attrs.NOTHING,
    factory: Callable[[], Any] | None = None,
    env: EnvVar | tuple[EnvVar, ...] = (),
    document: bool = True,
    converter: Callable[[Any], Any] | None = None,
    eq: bool = True,
    repr: bool = True,
) -> Any:
    """An attrs field described once: ``rule``, ``doc``, ``env`` and ``document`` go into its metadata.

    A runtime object (``document=False``) takes no part in equality unless ``eq`` says otherwise: two configs are
    equal when they describe the same cache. A ``converter`` (or a rule's ``plain``) never raises: a value it
    cannot convert is kept, for the rule to report.
    """
    if converter is None and rule is not None and rule.plain:
        converter = plain
    return attrs.field(
        default=default,
        factory=factory,
        converter=None if converter is None else _never_raising(converter),
        eq=eq,
        repr=_bounded_repr if repr else False,
        metadata={KEY: Spec(rule, doc, env if isinstance(env, tuple) else (env,), document)},
    )


def plain(value: object) -> object:
    """An int or str of a subclass as the plain int or str it holds (a bool stays a bool); anything else as it is."""
    kind = type(value)
    if kind is int or kind is str or kind is bool:
        return value
    if isinstance(value, int):
        return int.__index__(value)  # int's own method: a subclass cannot override what it returns
    if isinstance(value, str):
        return str.__str__(value)
    return value


def _never_raising(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def converted(value: object) -> object:
        try:
            return convert(value)
        except Exception:  # a caller's object whose methods raise: the rule says what is wrong with it
            return value

    converted.__doc__ = convert.__doc__
    return converted


def _bounded_repr(value: object) -> str:
    """A field in a config's repr: as ``repr`` shows it, but never failing (a caller's object whose ``__repr__``
    raises) and never an integer too long for ``str`` (Python refuses one of more than 4300 digits)."""
    if type(value) is int and value.bit_length() > 192:
        return show(value, typed=False)
    try:
        return builtins.repr(value)
    except Exception:
        return show(value, typed=False)


def same_as(cls: type, name: str, **kwargs: Any) -> Any:
    """A field of another class described exactly as ``cls.name`` (rule, doc, normalisation); ``kwargs`` go to
    ``attrs.field`` (e.g. a default). One description serves both classes."""
    source = attrs.fields_dict(cast(Any, cls))[name]
    return attrs.field(metadata=source.metadata, converter=source.converter, **kwargs)


def specs(cls: type) -> dict[str, Spec]:
    """Every described field of a config class, in declaration order."""
    return {f.name: f.metadata[KEY] for f in attrs.fields(cast(Any, cls)) if KEY in f.metadata}


def spec_of(cls: type, name: str) -> Spec:
    return cast(Spec, attrs.fields_dict(cast(Any, cls))[name].metadata[KEY])


# ---- rules -------------------------------------------------------------------------------------------------------


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(*, min: int | None = None, max: int | None = None, what: str | None = None) -> Rule:
    """An int (never a bool, str or float) within ``[min, max]``; ``what`` words the whole rule instead
    (``"a port number 1..65535"``)."""
    lo = -math.inf if min is None else min
    hi = math.inf if max is None else max

    def check(value: object) -> str | None:
        if type(value) is int or is_int(value):
            if lo <= value <= hi:  # type: ignore[operator]
                return None
            assert isinstance(value, int)
            if what is not None:
                return f"must be {what}, got {show(value)}"
            if min is not None and max is not None and max - min == 1:
                return f"must be {min} or {max}, got {show(value)}"
            if min is not None and value < min:
                return f"must be >= {min}, got {show(value)}"
            return f"must be <= {max}, got {show(value)}"
        return f"must be {what or 'an integer'}, got {show(value)}"

    facets: dict[str, Any] = {"type": "integer"}
    if min is not None:
        facets["minimum"] = min
    if max is not None:
        facets["maximum"] = max
    return Rule(check, facets, plain=True)


def one_of(allowed: Sequence[int]) -> Rule:
    """An int that is one of ``allowed``."""
    words = ", ".join(str(a) for a in allowed[:-1]) + f" or {allowed[-1]}"

    def check(value: object) -> str | None:
        if type(value) is int and value in allowed:
            return None
        if not is_int(value):
            return f"must be an integer, got {show(value)}"
        return None if value in allowed else f"must be {words}, got {show(value)}"

    return Rule(check, {"enum": list(allowed)}, plain=True)


#: The largest power of two upstream's ``usize`` holds.
MAX_POWER_OF_TWO = 2**63


def _power_of_two(value: object) -> str | None:
    if type(value) is int and 0 < value <= MAX_POWER_OF_TWO and not value & (value - 1):
        return None
    if not is_int(value):
        return f"must be an integer, got {show(value)}"
    return f"must be a power of two (1, 2, 4, ... 2**63), got {show(value)}"


power_of_two = Rule(_power_of_two, {"type": "integer", "minimum": 1, "maximum": MAX_POWER_OF_TWO}, plain=True)

_JSON_TYPES = {bool: "boolean", str: "string", int: "integer"}


def instance(*types: type, what: str) -> Rule:
    """An instance of one of ``types`` (a bool is no int here); ``what`` says in words what was expected."""
    bool_ok = bool in types

    def check(value: object) -> str | None:
        if isinstance(value, types) and (bool_ok or not isinstance(value, bool)):
            return None
        return f"must be {what}, got {show(value)}"

    json = [_JSON_TYPES[t] for t in types if t in _JSON_TYPES]
    if len(json) == 1:
        return Rule(check, {"type": json[0]}, plain=int in types or str in types)
    return Rule(check, {"class": types[0]} if len(types) == 1 and issubclass(types[0], Validated) else {})


#: The rule of every true/false field.
true_or_false = instance(bool, what="true or false")


def duck(names: Collection[str], what: str) -> Rule:
    """An object with the attributes ``names``: how runtime objects (filters, registries, event managers) are
    checked, since any class of the caller's may provide them."""
    names = tuple(names)

    def check(value: object) -> str | None:
        for name in names:
            if not hasattr(value, name):
                lacking = ", ".join(n for n in names if not hasattr(value, n))
                return f"must be {what} (lacks {lacking}), got {show(value)}"
        return None

    return Rule(check)


def optional(inner: Rule) -> Rule:
    """``None``, or what ``inner`` accepts."""
    inner_check = inner.check

    def check(value: object) -> str | None:
        return None if value is None else inner_check(value)

    return Rule(check, {"anyOf": [dict(inner.schema), {"type": "null"}]} if inner.schema else {}, plain=inner.plain)


def spelled(
    parse: Callable[[object], Any], *types: type, names: tuple[tuple[str, ...], str], nullable: bool = False
) -> dict[str, Any]:
    """A field whose value may also be given by name (``"FullyContiguous"``, ``"passthrough"``): the ``converter``
    and ``rule`` arguments of :func:`field`. ``parse`` reads a name (raising ConfigError with the message to show);
    a value it cannot read is kept, and the rule reports it with ``parse``'s message. ``names``: the accepted
    spellings and how they are read (``"words"``: case, ``_`` and ``-`` ignored; ``"trim"``: case and surrounding
    spaces ignored; ``"trim-dash"``: also ``_`` read as ``-``), for the JSON Schema."""

    def convert(value: object) -> object:
        if isinstance(value, types) or (nullable and value is None):
            return value
        try:
            return parse(value)
        except ConfigError:
            return value  # the rule says why

    def check(value: object) -> str | None:
        if isinstance(value, types) or (nullable and value is None):
            return None
        try:
            parse(value)
        except ConfigError as err:
            return err.problems[0].message
        return f"must be a {types[0].__name__}, got {show(value)}"

    return {"converter": convert, "rule": Rule(check, {"names": names, "nullable": nullable})}


_SPACE = re.compile(r"\s")


def _endpoint(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be an endpoint string such as 'tcp://localhost:5557', got {show(value)}"
    scheme, sep, rest = value.partition("://")
    if not sep or not scheme or not rest or _SPACE.search(value):
        return f"must look like 'tcp://host:port' or 'ipc:///path', got {show(value, typed=False)}"
    return None


#: A ZMQ-style endpoint such as ``tcp://localhost:5557`` or ``ipc:///tmp/kv``.
endpoint = Rule(_endpoint, {"type": "string", "pattern": r"^[^\s:]+://\S+$"}, plain=True)


_NONE_BAD: frozenset[str] = frozenset()
_NO_DEFAULT = object()


def _plain_default(field: Any) -> object:
    """A field's default when it is one shared value (``None``, ``1``, a frozen object), else a marker no value is."""
    default = field.default
    return _NO_DEFAULT if default is attrs.NOTHING or isinstance(default, attrs.Factory) else default  # type: ignore[arg-type]


def _raised(exc: Exception) -> str:
    return f"cannot be checked: the value's own code raised {show(exc, typed=False)}"


def _converted(field: Any, value: object) -> object:
    convert = field.converter
    return value if convert is None else convert(value)


# ---- the base of every config class -------------------------------------------------------------------------------


class Validated:
    """Base of every config class: each construction (``__init__``, ``attrs.evolve``, a builder's ``build()``)
    checks every field's rule, then the class's rules between fields, and raises one
    :class:`~kvbm_builder.errors.ConfigError` with every problem.

    Subclasses set ``_kvbm_root`` (the name used in messages, e.g. ``model``) and may override ``_relations``.
    A frozen config is immutable, so ``copy.copy`` and ``copy.deepcopy`` give it back itself (its runtime objects,
    such as the cancellation token and the metrics registry, are shared by reference, as they must be).
    """

    _kvbm_root: ClassVar[str] = ""
    _kvbm_checks: ClassVar[tuple[tuple[str, Check], ...]] = ()
    _kvbm_runtime: ClassVar[tuple[str, ...]] = ()  # fields a document cannot hold
    # what __attrs_post_init__ runs, worked out once per class: the checks, a getter of the values they check (one
    # C call for all), and whether the class has rules between fields
    _kvbm_rules: ClassVar[tuple[tuple[Check, object], ...]] = ()
    _kvbm_values: ClassVar[Callable[[Any], tuple[Any, ...]]] = staticmethod(lambda obj: ())
    _kvbm_related: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__attrs_attrs__" in cls.__dict__:  # the class attrs made (for a slotted class, the second one)
            described = specs(cls)
            cls._kvbm_checks = tuple((n, s.rule.check) for n, s in described.items() if s.rule is not None)
            cls._kvbm_runtime = tuple(n for n, s in described.items() if not s.document)
            fields = attrs.fields_dict(cast(Any, cls))
            # a value that is its field's own default is known good: compared, not checked (most fields of a chain)
            cls._kvbm_rules = tuple((check, _plain_default(fields[name])) for name, check in cls._kvbm_checks)
            names = [name for name, _ in cls._kvbm_checks]
            if len(names) == 1:
                cls._kvbm_values = staticmethod(lambda obj, name=names[0]: (getattr(obj, name),))
            elif names:
                cls._kvbm_values = staticmethod(operator.attrgetter(*names))
            cls._kvbm_related = cast(Any, cls)._relations.__func__ is not cast(Any, Validated)._relations.__func__

    def __attrs_post_init__(self) -> None:
        values = self._kvbm_values(self)  # type: ignore[call-arg]  # a staticmethod: mypy takes it as bound
        try:
            for (check, default), value in zip(self._kvbm_rules, values, strict=False):  # equal lengths, by design
                if value is not default and check(value) is not None:
                    return self._report()
            if self._kvbm_related and self._relations(self.__getattribute__, _NONE_BAD):
                self._report()
        except ConfigError:
            raise
        except Exception:  # a caller's object whose methods raise: check_values says which field holds it
            self._report()
        return None

    @classmethod
    def _relations(cls, get: Callable[[str], Any], bad: frozenset[str]) -> list[Problem]:
        """Problems between fields (paths relative to the object). ``get(name)`` reads a field; ``bad`` names the
        fields that broke their own rule (skip what depends on them)."""
        return []

    @classmethod
    def check_values(cls, values: Mapping[str, object]) -> list[Problem]:
        """Every problem with ``values`` (a partial mapping of field names to values is fine).

        A value whose own methods raise while it is checked (a caller's object with a failing ``__eq__``,
        ``__len__`` or attribute) is a problem of its field, never the caller's exception."""
        problems: list[Problem] = []
        bad: set[str] = set()
        fields = attrs.fields_dict(cast(Any, cls))
        values = {n: _converted(fields[n], v) for n, v in values.items() if n in fields}
        for name, check in cls._kvbm_checks:
            if name in values:
                try:
                    message = check(values[name])
                except Exception as exc:
                    message = _raised(exc)
                if message is not None:
                    problems.append(Problem((name,), message))
                    bad.add(name)
        try:
            problems.extend(cls._relations(values.get, frozenset(bad)))
        except Exception as exc:
            problems.append(Problem((), _raised(exc)))
        return problems

    def _report(self) -> None:
        values = {f.name: getattr(self, f.name) for f in attrs.fields(cast(Any, type(self)))}
        problems = self.check_values(values)
        if problems:
            raise ConfigError(problems, self._kvbm_root)

    def __copy__(self: _T) -> _T:
        return self

    def __deepcopy__(self: _T, memo: dict[int, Any]) -> _T:
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        # a runtime object (a token, a registry, an agent, memory) means nothing in another process: say which
        for name in self._kvbm_runtime:
            value = getattr(self, name)
            if value is not None:
                raise RuntimeObjectError(
                    [
                        Problem(
                            (name,),
                            f"{show(value)} cannot be pickled: it is a runtime object of this process; pickle "
                            "kvbm_builder.loading.dump(config) instead, load() it there and set runtime objects anew",
                        )
                    ],
                    self._kvbm_root,
                )
        return super().__reduce_ex__(protocol)
