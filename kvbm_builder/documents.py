"""Documents on disk: JSON, TOML or YAML chosen by suffix, read strictly; and TOML out, through tomli-w.

This is the one place that reads configuration files: whatever a file may hold (sizes, nesting, encodings, YAML's
tags) is judged here, before any document reaches :mod:`kvbm_builder.loading`.

Anything that stops a file from becoming a document (a missing file, a directory, an empty file, bad syntax, a
duplicate key, an unknown suffix) is a one-line :class:`~kvbm_builder.errors.LoadError` naming the file.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, LoadError, Problem, show

__all__ = ["SUFFIXES", "read_document", "to_toml"]

SUFFIXES = {".json": "JSON", ".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}
_YAML_EXTRA = "pip install 'kvbm-builder[yaml]'"


def _error(path: str | os.PathLike[str], message: str) -> LoadError:
    return LoadError([Problem((), message)], root=os.fspath(path))


def read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The document in ``path``, parsed by its suffix (``.json``, ``.toml``, ``.yaml``/``.yml``)."""
    file = Path(path)
    kind = SUFFIXES.get(file.suffix.lower())
    if kind is None:
        raise _error(path, f"cannot tell the format from the suffix {file.suffix!r}; name it .json, .toml or .yaml")
    try:
        data = file.read_bytes()
    except IsADirectoryError:
        raise _error(path, "is a directory, not a configuration file") from None
    except FileNotFoundError:
        raise _error(path, "no such file") from None
    except OSError as err:
        raise _error(path, f"cannot be read: {err.strerror or err}") from None
    except ValueError:  # a NUL byte in the name
        raise _error(path, "is not a file name: it contains a NUL byte") from None
    if not data.strip():
        raise _error(path, f"is empty; a configuration needs at least the `runtime` and `model` tables ({kind})")
    try:
        text = data.decode("utf-8-sig")  # a byte order mark is allowed, and the same in every format
    except UnicodeDecodeError as err:
        raise _error(path, f"is not UTF-8 text (byte {err.start})") from None
    document = _PARSERS[kind](path, text)
    if not isinstance(document, dict):
        raise _error(path, f"holds a {type(document).__name__}, not a table of keys and values ({kind})")
    return document


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {show(key, typed=False)}")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_json(path: str | os.PathLike[str], text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise _error(path, f"is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except ValueError as err:
        raise _error(path, f"is not valid JSON: {err}") from None
    except RecursionError:
        raise _error(path, "is not valid JSON: nested too deeply") from None


def _parse_toml(path: str | os.PathLike[str], text: str) -> object:
    tomllib = _toml()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _error(path, f"is not valid TOML: {err}") from None
    except ValueError as err:  # a value Python refuses, such as an integer of more than 4300 digits
        raise _error(path, f"is not valid TOML: {err}") from None
    except RecursionError:
        raise _error(path, "is not valid TOML: nested too deeply") from None


def _parse_yaml(path: str | os.PathLike[str], text: str) -> object:
    try:
        import yaml
    except ImportError:
        raise _error(path, f"is YAML, which needs PyYAML: {_YAML_EXTRA}") from None
    try:
        documents = list(yaml.load_all(text, Loader=_strict_loader()))
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise _error(path, f"is not valid YAML: {problem}{at}") from None
    except ValueError as err:  # a value Python refuses, such as an integer of more than 4300 digits
        raise _error(path, f"is not valid YAML: {err}") from None
    except RecursionError:
        raise _error(path, "is not valid YAML: nested too deeply") from None
    if len(documents) != 1:
        raise _error(path, f"holds {len(documents)} YAML documents; a configuration is exactly one")
    return documents[0]


_LOADER: list[Any] = []

# YAML 1.2's core schema: what a plain (unquoted) scalar is. YAML 1.1's yes/no/on/off booleans, sexagesimal
# numbers (1:30), leading-zero octals, underscores in numbers and timestamps stay text, which the loader then refuses
# where a bool or a number is needed, instead of silently reading `huge_pages: yes` as true or `mode: 1:30` as 90.
_CORE = (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+.0123456789",
    ),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("merge", r"^(?:<<)$", "<"),
)


def _strict_loader() -> Any:
    """PyYAML's safe loader, strictly: YAML 1.2 core scalars, a key given twice is an error (keys merged in by
    ``<<`` are overridden by the mapping's own, as YAML says), and keys are plain values."""
    if _LOADER:
        return _LOADER[0]
    import re as regex

    import yaml

    class StrictLoader(yaml.SafeLoader):
        """PyYAML's safe loader with YAML 1.2's core scalars only."""

    StrictLoader.yaml_implicit_resolvers = {}  # only _CORE below, none of YAML 1.1's

    for name, pattern, first in _CORE:
        StrictLoader.add_implicit_resolver(f"tag:yaml.org,2002:{name}", regex.compile(pattern), list(first))

    def boolean(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
        text = str(loader.construct_scalar(node))
        if text.lower() not in ("true", "false"):
            raise yaml.constructor.ConstructorError(
                None, None, f"{show(text, typed=False)} is not true or false", node.start_mark
            )
        return text.lower() == "true"

    def integer(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
        text = str(loader.construct_scalar(node))
        base = {"0o": 8, "0x": 16}.get(text[:2], 10)
        try:
            return int(text[2:] if base != 10 else text, base)
        except ValueError:
            shown = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown!r} is not an integer Python reads (at most 4300 digits)", node.start_mark
            ) from None

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        own: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, got a {type(key).__name__}", key_node.start_mark
                )
            if key in own:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key, typed=False)}", key_node.start_mark
                )
            own.add(key)
        loader.flatten_mapping(node)  # merged pairs first, then the mapping's own: later wins
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, got a {type(key).__name__}", key_node.start_mark
                )
            out[key] = loader.construct_object(value_node, deep=True)
        return out

    StrictLoader.add_constructor("tag:yaml.org,2002:bool", boolean)
    StrictLoader.add_constructor("tag:yaml.org,2002:int", integer)
    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    _LOADER.append(StrictLoader)
    return StrictLoader


_PARSERS = {"JSON": _parse_json, "TOML": _parse_toml, "YAML": _parse_yaml}


# ---- writing TOML ------------------------------------------------------------------------------------------------


def _null(value: object, path: str) -> str | None:
    """The dotted path of the first null in ``value`` (TOML has none), or None."""
    if value is None:
        return path
    if isinstance(value, Mapping):
        for key, inner in value.items():
            found = _null(inner, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    return None


def to_toml(data: Mapping[str, Any], comments: Mapping[str, str] | None = None) -> str:
    """``data`` (plain values, as :func:`dump` gives) as a TOML document, written by tomli-w. ``comments`` maps
    dotted paths of values to a comment written after them (``show --sources``)."""
    import tomli_w

    null = _null(data, "")
    if null is not None:
        raise ConfigError([Problem((), f"{null} is null, which TOML cannot write; use JSON")])
    text = tomli_w.dumps(data)
    if not comments:
        return text
    lines, table = [], ""
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            table = ".".join(_keys(line[1:-1]))
        elif " = " in line:
            (key,) = _keys(line.partition(" = ")[0])
            note = comments.get(f"{table}.{key}" if table else key)
            line = f"{line}  # {note}" if note is not None else line
        lines.append(line)
    return "\n".join(lines) + "\n"


def _keys(dotted: str) -> list[str]:
    """The keys of a TOML dotted key as tomli-w writes it (bare or quoted), read back by TOML itself."""
    parsed: Any = _toml().loads(f"{dotted} = 0")
    keys = []
    while isinstance(parsed, dict):
        ((key, parsed),) = parsed.items()
        keys.append(key)
    return keys


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
    return tomllib
