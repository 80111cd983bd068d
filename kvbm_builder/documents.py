"""Documents on disk: JSON, TOML or YAML chosen by suffix, read strictly; and TOML out, through tomli-w.

This is the one place that reads configuration files: whatever a file may hold (sizes, nesting, encodings, YAML's
tags) is judged here, before any document reaches :mod:`kvbm_builder.loading`.

Anything that stops a file from becoming a document (a missing file, a directory, an empty file, bad syntax, a
duplicate key, an unknown suffix) is a one-line :class:`~kvbm_builder.errors.LoadError` naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from collections.abc import Mapping
from typing import Any, TypeAlias

from .config.sizes import format_bytes
from .errors import ConfigError, LoadError, Problem, show

__all__ = ["MAX_DOCUMENT_BYTES", "MAX_EXPANDED_VALUES", "SUFFIXES", "parse_json", "read_document", "to_toml"]

SUFFIXES = {".json": "JSON", ".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}
_YAML_EXTRA = "pip install 'kvbm-builder[yaml]'"
#: A file name: text, bytes (as the system gives them) or a path object.
PathArg: TypeAlias = "str | bytes | os.PathLike[str] | os.PathLike[bytes]"


#: The most bytes a configuration file may hold. A configuration is a few tables (the example is about 1 KiB);
#: past this a file is no configuration, and reading it whole could exhaust memory (``/dev/zero``, a sparse file).
MAX_DOCUMENT_BYTES = 64 * 1024
#: The most values a YAML document may hold once its aliases are expanded: a few hundred bytes of nested aliases
#: (a "billion laughs") would otherwise stand for more values than any program can walk.
MAX_EXPANDED_VALUES = 100_000

_NOT_REGULAR = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _error(path: PathArg, message: str) -> LoadError:
    return LoadError([Problem((), message)], root=_name(path))


def _name(path: PathArg) -> str:
    """The path as messages show it (undecodable bytes as surrogates: the CLI escapes them when it prints)."""
    return os.fsdecode(path)


def read_document(path: PathArg) -> dict[str, Any]:
    """The document in ``path``, parsed by its suffix (``.json``, ``.toml``, ``.yaml``/``.yml``).

    Only a regular file of at most :data:`MAX_DOCUMENT_BYTES` is read (a pipe, a device or a socket is refused
    before a byte is read); a YAML document whose aliases expand past :data:`MAX_EXPANDED_VALUES` values, or refer
    to themselves, is refused.
    """
    try:
        name = _name(path)
    except TypeError:
        raise LoadError([Problem((), f"a file name must be text, bytes or a path, got {show(path)}")]) from None
    kind = SUFFIXES.get(os.path.splitext(name)[1].lower())
    if kind is None:
        suffix = os.path.splitext(name)[1]
        raise _error(
            path, f"cannot tell the format from the suffix {show(suffix, typed=False)}; name it .json, .toml or .yaml"
        )
    data = _read(path)
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


def _read(path: PathArg) -> bytes:
    """The bytes of a regular file of at most MAX_DOCUMENT_BYTES. Opened without blocking, so that a named pipe
    with no writer is refused rather than waited on; then its type is asked of the open file, not of the name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except IsADirectoryError:
        raise _error(path, "is a directory, not a configuration file") from None
    except FileNotFoundError:
        raise _error(path, "no such file") from None
    except OSError as err:
        if err.errno == errno.ENXIO and _is_socket(path):  # a socket cannot even be opened
            raise _error(path, "is a socket, not a configuration file; only regular files are read") from None
        raise _error(path, f"cannot be read: {err.strerror or err}") from None
    except ValueError:  # a NUL byte in the name
        raise _error(path, "is not a file name: it contains a NUL byte") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise _error(path, "is a directory, not a configuration file")
        what = next((words for test, words in _NOT_REGULAR if test(info.st_mode)), None)
        if what is not None or not stat.S_ISREG(info.st_mode):
            raise _error(
                path, f"is {what or 'not a regular file'}, not a configuration file; only regular files are read"
            )
        if info.st_size > MAX_DOCUMENT_BYTES:
            raise _too_large(path, info.st_size)
        chunks, left = [], MAX_DOCUMENT_BYTES + 1  # a file that grows, or one whose size says 0 (/proc), is capped too
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as err:
        raise _error(path, f"cannot be read: {err.strerror or err}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise _too_large(path, None)
    return data


def _is_socket(path: PathArg) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _too_large(path: PathArg, size: int | None) -> LoadError:
    held = "more than that" if size is None else format_bytes(size)
    return _error(
        path,
        f"holds {held}; a configuration file may hold at most {MAX_DOCUMENT_BYTES} bytes "
        "(kvbm_builder.documents.MAX_DOCUMENT_BYTES)",
    )


def _brief(said: object) -> str:
    """A parser's message, on one line and short (some quote the whole value or tag they could not read)."""
    text = (str(said).splitlines() or [type(said).__name__])[0]
    return text if len(text) <= 200 else f"{text[:200]}..."


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {show(key, typed=False)}")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: str) -> object:
    """JSON as every reader here takes it: a key given twice, ``NaN`` and ``Infinity`` are errors (ValueError; a
    :class:`json.JSONDecodeError` for bad syntax), and so is nesting too deep for Python (RecursionError)."""
    return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)


def _parse_json(path: PathArg, text: str) -> object:
    try:
        return parse_json(text)
    except json.JSONDecodeError as err:
        raise _error(path, f"is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except ValueError as err:
        raise _error(path, f"is not valid JSON: {_brief(err)}") from None
    except RecursionError:
        raise _error(path, "is not valid JSON: nested too deeply") from None


def _parse_toml(path: PathArg, text: str) -> object:
    tomllib = _toml()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _error(path, f"is not valid TOML: {_brief(err)}") from None
    except ValueError as err:  # a value Python refuses, such as an integer of more than 4300 digits
        raise _error(path, f"is not valid TOML: {_brief(err)}") from None
    except RecursionError:
        raise _error(path, "is not valid TOML: nested too deeply") from None


def _parse_yaml(path: PathArg, text: str) -> object:
    try:
        import yaml
    except ImportError:
        raise _error(path, f"is YAML, which needs PyYAML: {_YAML_EXTRA}") from None
    try:
        documents = list(yaml.load_all(text, Loader=_strict_loader()))
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = _brief(getattr(err, "problem", None) or err)
        raise _error(path, f"is not valid YAML: {problem}{at}") from None
    except ValueError as err:  # a value Python refuses: an integer of more than 4300 digits, `!!float abc`
        raise _error(path, f"is not valid YAML: {_brief(err)}") from None
    except RecursionError:
        raise _error(path, "is not valid YAML: nested too deeply") from None
    if len(documents) != 1:
        raise _error(path, f"holds {len(documents)} YAML documents; a configuration is exactly one")
    shared = _aliasing_problem(documents[0])
    if shared is not None:
        raise _error(path, f"is not a configuration: {shared}")
    return documents[0]


def _aliasing_problem(document: object) -> str | None:
    """What is wrong with the values YAML's aliases share in ``document``: a value that contains itself, or more
    than MAX_EXPANDED_VALUES values once every alias is expanded. Each shared value is walked once (its expanded
    count remembered), and without recursion, so this is as fast as the document is small, however deep."""
    counts: dict[int, int] = {}  # id of a list or table -> values in it once expanded (itself included)
    open_ids: set[int] = set()  # lists and tables being walked: meeting one again is a cycle
    stack: list[tuple[object, bool]] = [(document, False)]
    while stack:
        value, done = stack.pop()
        if not isinstance(value, (dict, list)):
            continue
        key = id(value)
        inner = list(value.values()) if isinstance(value, dict) else value
        if done:
            total = 1 + sum(counts.get(id(item), 1) for item in inner)
            if isinstance(value, dict):
                total += len(value)  # the keys, plain values
            if total > MAX_EXPANDED_VALUES:
                return (
                    f"its aliases expand to more than {MAX_EXPANDED_VALUES} values "
                    "(kvbm_builder.documents.MAX_EXPANDED_VALUES); write the values out instead of nesting aliases"
                )
            counts[key] = total
            open_ids.discard(key)
            continue
        if key in open_ids:
            return "an alias refers to a value that contains it (a cycle); a configuration is a tree"
        if key in counts:
            continue
        open_ids.add(key)
        stack.append((value, True))
        stack.extend((item, False) for item in inner if isinstance(item, (dict, list)))
    return None


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
    # and only the core schema's values, which JSON and TOML can hold too: no !!set, !!binary, !!timestamp,
    # !!omap or !!pairs (any other tag is an error naming it: the constructor of tag None says so)
    core = {f"tag:yaml.org,2002:{name}" for name in ("null", "str", "float", "seq")} | {None}
    StrictLoader.yaml_constructors = {t: c for t, c in yaml.SafeLoader.yaml_constructors.items() if t in core}

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

    def key_of(loader: yaml.SafeLoader, key_node: yaml.Node) -> Any:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool, type(None))):
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, got a {type(key).__name__}", key_node.start_mark
            )
        return key

    def merged(loader: yaml.SafeLoader, node: yaml.Node) -> dict[Any, Any]:
        """What a ``<<`` key merges in: one mapping, or a list of them where the first wins. Each merged mapping is
        constructed once (an alias is the same dict every time), so merges nested many times stay small."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        out: dict[Any, Any] = {}
        for source in reversed(sources):
            if not isinstance(source, yaml.MappingNode):
                raise yaml.constructor.ConstructorError(
                    None, None, f"`<<` merges mappings, not a {source.id}", source.start_mark
                )
            table = loader.construct_object(source, deep=True)
            if not isinstance(table, dict):  # a mapping node with a tag of its own, such as !!set
                raise yaml.constructor.ConstructorError(
                    None, None, f"`<<` merges mappings, not a {type(table).__name__}", source.start_mark
                )
            out.update(table)
        return out

    def mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):  # `!!map [1]`
            raise yaml.constructor.ConstructorError(None, None, f"!!map tags a {type(node).__name__}", node.start_mark)
        # merged keys first, then the mapping's own, which win; a key given twice in the mapping itself is an error
        out: dict[Any, Any] = {}
        own: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                out.update(merged(loader, value_node))
                continue
            key = key_of(loader, key_node)
            if key in own:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key, typed=False)}", key_node.start_mark
                )
            own[key] = loader.construct_object(value_node, deep=True)
        out.update(own)
        return out

    StrictLoader.add_constructor("tag:yaml.org,2002:bool", boolean)
    StrictLoader.add_constructor("tag:yaml.org,2002:int", integer)
    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    _LOADER.append(StrictLoader)
    return StrictLoader


_PARSERS = {"JSON": _parse_json, "TOML": _parse_toml, "YAML": _parse_yaml}


# ---- writing TOML ------------------------------------------------------------------------------------------------


_INT64 = range(-(2**63), 2**63)


def _unwritable(value: object, path: str) -> str | None:
    """Why the first value of ``value`` that TOML 1.0 cannot hold cannot be written (a null; an integer outside
    64 bits, which a TOML reader may refuse or misread), with its dotted path; None when every value can be."""
    if value is None:
        return f"{path} is null, which TOML cannot write"
    if type(value) is int and value not in _INT64:
        return f"{path} is {show(value, typed=False)}, past the 64-bit integers TOML 1.0 can write"
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        name = key if isinstance(key, str) else show(key, typed=False)
        found = _unwritable(inner, f"{path}[{key}]" if isinstance(value, list) else f"{path}.{name}" if path else name)
        if found is not None:
            return found
    return None


def to_toml(data: Mapping[str, Any], comments: Mapping[str, str] | None = None) -> str:
    """``data`` (plain values, as :func:`dump` gives) as a TOML document, written by tomli-w. ``comments`` maps
    dotted paths of values to a comment written after them (``show --sources``). A value TOML cannot hold (a null,
    an integer outside 64 bits) is a ConfigError naming its path."""
    import tomli_w

    problem = _unwritable(data, "")
    if problem is not None:
        raise ConfigError([Problem((), f"{problem}; use JSON")])
    text = tomli_w.dumps(data)
    if not comments:
        return text
    lines, table = [], ""
    for line in text.splitlines():
        header = _keys(line[2:-2] if line.startswith("[[") else line[1:-1]) if line.endswith("]") else None
        if line.startswith("[") and header:
            table = ".".join(header)
        elif not line.startswith((" ", "]")):  # not an item or the end of an array written over several lines
            key = _keys(line)
            note = comments.get(f"{table}.{key[0]}" if table else key[0]) if key else None
            line = f"{line}  # {note}" if note is not None else line
        lines.append(line)
    return "\n".join(lines) + "\n"


def _keys(text: str) -> list[str]:
    """The dotted key of a ``[table]`` header's text, or the key of a whole ``key = value`` line, as TOML itself reads
    it (bare or quoted); ``[]`` for text that is neither (the first line of an array written over several)."""
    tomllib = _toml()
    try:
        parsed: Any = tomllib.loads(text if " = " in text else f"{text} = 0")
    except tomllib.TOMLDecodeError:
        return []
    if " = " in text:
        return [next(iter(parsed))] if len(parsed) == 1 else []
    keys = []
    while isinstance(parsed, dict) and len(parsed) == 1:
        ((key, parsed),) = parsed.items()
        keys.append(key)
    return keys


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
    return tomllib
