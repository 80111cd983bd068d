"""What the loader and command-line fuzz families draw: documents (valid ones, near misses, hostile shapes) as data and
as JSON, TOML or YAML text; values and objects a caller might hand a builder; ``DYN_KVBM_*`` environments; and the
checks every input must pass (only KvbmErrors, each with a path and a short message; nothing left open).
"""

from __future__ import annotations

import enum
import json
import math
import os
import random
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w
import yaml
from hypothesis import strategies as st
from syscalls import open_fds

from kvbm_builder import ConfigError, KvbmError, LoadError
from kvbm_builder.config import DiskAllocator, SystemAllocator
from kvbm_builder.config.env import (
    DYN_KVBM_CACHE_STATS_MAX_REQUESTS,
    DYN_KVBM_CPU_CACHE_GB,
    DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS,
    DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER,
    DYN_KVBM_DISK_CACHE_DIR,
    DYN_KVBM_DISK_CACHE_GB,
    DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS,
    DYN_KVBM_DISK_DISABLE_O_DIRECT,
    DYN_KVBM_DISK_ZEROFILL_FALLBACK,
    DYN_KVBM_ENABLE_NUMA,
    DYN_KVBM_MAX_CONCURRENT_TRANSFERS,
    DYN_KVBM_MAX_TRANSFER_BATCH_SIZE,
    DYN_KVBM_METRICS,
    DYN_KVBM_METRICS_PORT,
    DYN_KVBM_USE_HUGE_PAGES,
)
from kvbm_builder.loading import to_toml

# Inputs are made from a seed by a plain random.Random (cheap, and deterministic under CI's derandomized seeds):
# hypothesis then draws only the seed of each input, which keeps thousands of inputs within seconds.

SEEDS = st.integers(0, 2**64 - 1)

# ---- names, spelled every way a user (or a look-alike character) might ------------------------------------------

NAMES = {
    "layout_type": ["FullyContiguous", "LayerSeparateOuterContiguous", "LayerSeparateBlockContiguous", "striped"],
    "kind": ["device", "pinned", "system", "disk", "gpu"],
    "nixl": ["enabled", "disabled", "enabled_with_agent"],
    "mode": ["register", "host_alloc", "cuda", "dedup", "passthrough"],
    "logical": ["LeaderWorkerSharded", "sharded"],
    "engine_source": ["vllm", "gpu", "trtllm", "tensorrt-llm", "kvbm"],
}
#: letters that str.lower() turns into ASCII ones, or that look like them
LOOKALIKES = {"k": "\u212a", "K": "\u212a", "s": "\u017f", "i": "\u0131", "e": "\u0435"}
#: spaces of every kind: ASCII's, those str.strip() knows and ECMA-262 does not, and the other way round
SPACES = [" ", "\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u2028", "\ufeff"]


def spelling(rng: random.Random, words: list[str]) -> str:
    """One of ``words`` spelled some way: case, ``_`` and ``-`` anywhere, spaces around, look-alike letters."""
    out = []
    for ch in rng.choice(words):
        if ch in LOOKALIKES and rng.random() < 0.03:
            out.append(LOOKALIKES[ch])
            continue
        out.append(ch.upper() if rng.random() < 0.5 else ch.lower())
        if rng.random() < 0.1:
            out.append(rng.choice(["_", "-", "__", " "]))
    text = "".join(out)
    if rng.random() < 0.2:
        text = rng.choice(SPACES) + text
    if rng.random() < 0.2:
        text += rng.choice(SPACES)
    return text


def layout_table(rng: random.Random) -> object:
    """A table form of a layout, right or wrong."""
    roll = rng.random()
    if roll < 0.5:
        flag = rng.choice([True, False, True, False, "yes", 1, None])
        return {spelling(rng, ["LayerSeparate", "Layer_Separate"]): {"outer_contiguous": flag}}
    if roll < 0.8:
        return {spelling(rng, ["FullyContiguous"]): rng.choice([None, {}, [], 0, "", False])}
    return {spelling(rng, ["LayerSeparate"]): rng.choice([{}, {"outer_contiguous": True, "x": 1}, True])}


# ---- values ---------------------------------------------------------------------------------------------------------

HUGE = int("9" * 4299)
BOUNDARY_INTS = [0, 1, -1, 2, 3, 4, 1024, 2**31 - 1, 2**31, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1]
TEXTS = ["16GiB", "1e3", " 4 kb ", "0.5GB", "16 gigs", "1e999999999", "9" * 80, "", "\0", "/tmp", "\udcff", "é"]


def nested(depth: int, leaf: object, table: bool) -> object:
    value = leaf
    for _ in range(depth):
        value = {"k": value} if table else [value]
    return value


def scalar(rng: random.Random) -> object:
    roll = rng.randrange(14)
    if roll == 0:
        return rng.randint(-3, 70)
    if roll == 1:
        return rng.choice(BOUNDARY_INTS)
    if roll == 2:
        return rng.choice([HUGE, -HUGE, 2**14000, 10**300])
    if roll == 3:
        return rng.choice([True, False])
    if roll == 4:
        return None
    if roll == 5:
        return rng.choice([4.0, 1e3, 0.5, -0.0, math.inf, -math.inf, math.nan, 1e308, 2.0**64])
    if roll == 6:
        return rng.choice(TEXTS)
    if roll == 7:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000)])) for _ in range(8))
    if roll == 8:
        return "x" * rng.choice([300, 5000])
    if roll == 9:
        return layout_table(rng)
    return spelling(rng, rng.choice(list(NAMES.values())))


def plain_value(rng: random.Random, depth: int = 0) -> object:
    """What a JSON, TOML or YAML document can hold, with an eye for the edges (deep nesting too)."""
    roll = rng.random()
    if roll < 0.02:  # (PyYAML's scanner takes a second over a thousand levels: rarely)
        return nested(rng.choice([50, 400, 990, 1200]), scalar(rng), rng.random() < 0.5)
    if roll < 0.15 and depth < 3:
        return [plain_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if roll < 0.25 and depth < 3:
        return {
            rng.choice(["k", "num_blocks", "kind", "", "é", "x" * 100]): plain_value(rng, depth + 1) for _ in range(3)
        }
    return scalar(rng)


class Boom(Exception):
    """What a caller's object raises."""


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise Boom("boom")


class Raises:
    """A caller's object every method of which raises (attribute lookups too)."""

    __getattr__ = __repr__ = __str__ = __eq__ = __hash__ = __len__ = __iter__ = __bool__ = __index__ = _boom
    __lt__ = __le__ = __gt__ = __ge__ = __format__ = __fspath__ = _boom


class Number(int):
    """An int whose comparisons, hash and repr raise."""

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = __repr__ = __index__ = _boom  # type: ignore[assignment]


class Word(str):
    """A str whose methods raise."""

    lower = strip = replace = isascii = partition = __eq__ = __hash__ = __len__ = __contains__ = _boom  # type: ignore[assignment]
    __repr__ = __iter__ = _boom  # type: ignore[assignment]


class Table(dict):  # type: ignore[type-arg]
    """A dict whose lookups raise."""

    __getitem__ = get = items = keys = values = __len__ = __iter__ = __contains__ = __repr__ = _boom  # type: ignore[assignment]


class Size(enum.IntEnum):
    FOUR = 4
    SIXTEEN = 16


class Duck:
    """A storage-like object whose fields are wrong in every way."""

    def __init__(self, kind: object, addr: object, size: object) -> None:
        self.kind, self.addr, self.size = kind, addr, size


def recursive_list() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def caller_value(rng: random.Random) -> object:
    """What a caller may hand a builder: anything a document holds, and objects no document does."""
    roll = rng.randrange(12)
    if roll == 0:
        return rng.choice([Size.FOUR, Size.SIXTEEN])
    if roll == 1:
        return Number(rng.randint(0, 64))
    if roll == 2:
        return Word(spelling(rng, rng.choice(list(NAMES.values()))))
    if roll == 3:
        return rng.choice([Raises(), Table(), recursive_list()])
    if roll == 4:
        return rng.choice([object(), object, len, b"bytes", bytearray(b"x"), {1, 2}, (1, 2), 1j, [SystemAllocator()]])
    if roll == 5:
        return rng.choice([SystemAllocator(), DiskAllocator(directory="/nonexistent/kvbm-fuzz")])
    if roll == 6:
        return Duck(rng.choice([None, "system", Raises()]), rng.randint(-1, 10), rng.choice([-1, 10, HUGE]))
    return plain_value(rng)


# ---- documents ------------------------------------------------------------------------------------------------------


def base_document() -> dict[str, Any]:
    return {
        "runtime": {"worker_id": 0, "nixl": "disabled"},
        "model": {"num_layers": 2, "outer_dim": 2, "page_size": 4, "inner_dim": 8, "dtype_width_bytes": 2},
        "host_layout": {"num_blocks": 4, "allocator": {"kind": "system"}},
        "disk_layout": {"size": "64KiB", "allocator": {"kind": "disk", "directory": "/nonexistent/kvbm-fuzz"}},
    }


KEYS = {
    "": ["runtime", "model", "device_layout", "host_layout", "disk_layout", "consolidator_config", "kvbm_metrics"],
    "runtime": ["worker_id", "nixl", "cancellation_token"],
    "model": ["num_layers", "outer_dim", "page_size", "inner_dim", "dtype_width_bytes"],
    "layout": ["num_blocks", "size", "layout_type", "allocator", "logical", "alignment", "storage", "offload_filter"],
    "allocator": ["kind", "device_id", "mode", "huge_pages", "numa", "threads", "directory", "o_direct"],
    "consolidator_config": ["engine_endpoint", "output_endpoint", "engine_source", "mode"],
}
NEW_TABLES = {
    "device_layout": {"num_blocks": 2, "allocator": {"kind": "device"}},
    "consolidator_config": {"engine_source": "vllm", "output_endpoint": "tcp://*:5559"},
}


def table_keys(path: tuple[str, ...]) -> list[str]:
    if not path:
        return KEYS[""]
    if path[-1] == "allocator":
        return KEYS["allocator"]
    if path[-1].endswith("_layout"):
        return KEYS["layout"]
    return KEYS.get(path[-1], ["x"])


def document(rng: random.Random, most_changes: int = 5) -> Any:
    """A document: the base with a few changes (a value replaced or respelled, a key dropped or added, a table added
    or replaced), or anything at all."""
    if rng.random() < 0.05 * most_changes / 5:
        return plain_value(rng)
    made: dict[str, Any] = json.loads(json.dumps(base_document()))
    for key, table in NEW_TABLES.items():
        if rng.random() < 0.2:
            made[key] = json.loads(json.dumps(table))
    for _ in range(rng.randint(0, most_changes)):
        path: tuple[str, ...] = ()
        table: Any = made
        while rng.random() < 0.6:
            keys = [k for k in table if isinstance(table[k], dict)]
            if not keys:
                break
            key = rng.choice(keys)
            path, table = (*path, key), table[key]
        key = rng.choice([*table_keys(path), "unknown", "dtype_width_byte"])
        roll = rng.random()
        if roll < 0.2:
            table.pop(key, None)
        elif roll < 0.5 and key in NAMES:
            table[key] = spelling(rng, NAMES[key])
        elif roll < 0.6 and key == "layout_type":
            table[key] = layout_table(rng)
        elif roll < 0.7 and key in ("num_blocks", "size", "alignment", "worker_id", "num_layers", "page_size"):
            table[key] = rng.choice([1, 2, 4096, 2**20, 2**40, 2**62, 2**63, 2**64 - 1, "1GiB", "9TiB", "1e9GiB"])
        else:
            table[key] = plain_value(rng)
    return made


# ---- as text ---------------------------------------------------------------------------------------------------------


def as_json(value: object) -> str:
    try:
        return json.dumps(value, allow_nan=True, default=repr)
    except (RecursionError, ValueError):  # nested past what json writes, or an integer past what str() writes
        return "{}"


def as_toml(value: object) -> str:
    try:
        return tomli_w.dumps(value)  # type: ignore[arg-type]
    except Exception:  # not a table of TOML's values: TOML is then given JSON's text
        return as_json(value)


def as_yaml(value: object) -> str:
    try:
        return yaml.safe_dump(value, allow_unicode=True)
    except Exception:  # JSON is YAML too
        return as_json(value)


YAML_SHAPES = [
    # nested aliases, each level standing for many values
    "x:\n" + "".join(f"  a{d}: &a{d} [" + ", ".join([f"*a{d - 1}" if d else "1"] * 12) + "]\n" for d in range(7)),
    "x:\n"
    + "".join(
        "x:\n"
        + "".join(
            f"  a{d}: &a{d} {{" + ", ".join(f"k{i}: {f'*a{d - 1}' if d else 1}" for i in range(9)) + "}\n"
            for d in range(7)
        ),
    ),
    # merges nested many times
    "x:\n  a0: &a0 {p: 1, q: 2}\n"
    + "".join(f"  a{d}: &a{d} {{<<: [{', '.join([f'*a{d - 1}'] * 10)}]}}\n" for d in range(1, 7)),
    "host_layout: &h {num_blocks: 4, allocator: {kind: system}}\ndisk_layout: {<<: *h, allocator: {kind: disk}}\n",
    "x: &a [*a]\n",
    "x: &a {k: *a}\n",
    "x: !!set {a, b}\n",
    "x: !!timestamp nope\n",
    "x: !!binary '%%%'\n",
    "x: !!map [1]\n",
    "x: !!python/object:os.system {}\n",
    "x: {<<: !!set {a}}\n",
    "x: {<<: 1}\n",
    "? [1, 2]\n: 1\n",
    "a: 1\n---\nb: 2\n",
    "x: 1:30\n",
    "x: 0o17\n",
    "x: !!int 99999999999999999999999999999999999999999999999999\n",
    "x: !!float " + "z" * 500 + "\n",
    "x: !!str\n",
    "x: *undefined\n",
    "x: &a 1\ny: &a 2\nz: *a\n",
]


def document_text(rng: random.Random) -> tuple[str, bytes]:
    """(suffix, file contents): a document in a format, maybe with a hostile YAML shape added, cut short, with bytes
    replaced, or bytes that are no document at all."""
    suffix = rng.choice([".json", ".toml", ".yaml", ".yml", ".JSON", ".Yaml", ".ini", ""])
    made = document(rng)
    render = {".json": as_json, ".toml": as_toml}.get(suffix.lower(), as_yaml)
    text = render(made)
    if suffix.lower() in (".yaml", ".yml") and rng.random() < 0.3:
        shape = rng.choice(YAML_SHAPES)
        keys = {line.partition(":")[0] for line in shape.splitlines() if line and not line.startswith(" ")}
        text = as_yaml({k: v for k, v in base_document().items() if k not in keys}) + shape
    data = text.encode("utf-8", "surrogatepass")
    roll = rng.random()
    if roll < 0.08 and data:
        data = data[: rng.randrange(len(data))]
    elif roll < 0.16 and data:
        at = rng.randrange(len(data))
        data = data[:at] + rng.randbytes(rng.randint(1, 4)) + data[at + 1 :]
    elif roll < 0.2:
        data = rng.choice([b"", b"\xef\xbb\xbf", b"\xff\xfe", b" \n\t", b"{" * 5000, b"[1, 2]", b"null", b"\0" * 9])
    elif roll < 0.24:
        data = b"\xef\xbb\xbf" + data
    elif roll < 0.26:
        data = data + b" " * (64 * 1024)  # past the size cap
    return suffix, data


# ---- environments ----------------------------------------------------------------------------------------------------

VARIABLES = [
    DYN_KVBM_CPU_CACHE_GB,
    DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS,
    DYN_KVBM_DISK_CACHE_GB,
    DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS,
    DYN_KVBM_DISK_CACHE_DIR,
    DYN_KVBM_DISK_DISABLE_O_DIRECT,
    DYN_KVBM_DISK_ZEROFILL_FALLBACK,
    DYN_KVBM_USE_HUGE_PAGES,
    DYN_KVBM_ENABLE_NUMA,
    DYN_KVBM_METRICS,
    DYN_KVBM_METRICS_PORT,
    DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER,
    DYN_KVBM_MAX_CONCURRENT_TRANSFERS,
    DYN_KVBM_MAX_TRANSFER_BATCH_SIZE,
    DYN_KVBM_CACHE_STATS_MAX_REQUESTS,
]
ENV_TEXTS = [
    "0.001", "2", "64", "/tmp", "true", "0", "1",  # what works, so that most environments apply
    "4", "+10", "-5", "4.0", "1e3", "0.5", ".5", "10 ", " 10", "", " ", "true", "yes", "off", "On", "nope",
    "0x10", "1_000", "18446744073709551615", "18446744073709551616", "9" * 5000, "1e999999999", "NaN", "inf", "\u0663",
    "/tmp", "relative/dir", "\udcff", "é", "\t",
]  # fmt: skip


def environ(rng: random.Random) -> dict[str, str]:
    """Some DYN_KVBM_* variables, each set to text of some kind."""
    names = rng.sample([*VARIABLES, "DYN_KVBM_UNKNOWN"], rng.randrange(6))
    return {name: rng.choice(ENV_TEXTS) if rng.random() < 0.8 else str(scalar(rng))[:40] for name in names}


# ---- command lines ----------------------------------------------------------------------------------------------


@contextmanager
def cli_workspace() -> Iterator[Path]:
    """Files of every kind, made once: valid configurations in each format, and things that are no configuration."""
    with tempfile.TemporaryDirectory(prefix="kvbm-fuzz-cli-") as base:
        root = Path(base)
        cache = root / "cache"
        cache.mkdir()
        valid = {
            **base_document(),
            "disk_layout": {"size": "64KiB", "allocator": {"kind": "disk", "directory": str(cache)}},
        }
        (root / "valid.json").write_text(json.dumps(valid))
        (root / "valid.yaml").write_text(json.dumps(valid))
        (root / "valid.toml").write_text(to_toml(valid))
        (root / "invalid.json").write_text(json.dumps({**valid, "model": {**valid["model"], "num_layers": 0}}))
        (root / "laughs.yaml").write_text(YAML_SHAPES[0])
        os.mkfifo(root / "fifo.json")
        (root / "dir.json").mkdir()
        (root / "zero.json").symlink_to("/dev/zero")
        (root / "big.json").write_text(json.dumps(valid) + " " * 70_000)
        (root / "latin1.toml").write_bytes(b"[runtime]\nworker_id = 0 # caf\xe9\n")
        Path(os.fsdecode(os.fsencode(root) + b"/\xff\xfe.json")).write_text(json.dumps(valid))
        (root / "caf\u00e9.json").write_text(json.dumps(valid))
        (root / "c.ini").write_text("[runtime]\n")
        yield root


FIXED = [
    "valid.json", "valid.yaml", "valid.toml", "invalid.json", "laughs.yaml", "fifo.json", "dir.json", "zero.json",
    "big.json", "latin1.toml", "\udcff\udcfe.json", "caf\u00e9.json", "c.ini", "missing.yaml", "a" * 300 + ".json",
    "drawn",
]  # fmt: skip
SET_KEYS = [
    "host_layout.size", "host_layout.num_blocks", "model.num_layers", "model", "runtime.worker_id", "disk_layout",
    "disk_layout.allocator.directory", "host_layout.allocator.kind", "host_layout.layout_type", "device_layout",
    "model.num_layers.x", "", ".", "a..b", "host_layout.", "\udcff", "é.x", "x" * 500, "consolidator_config.mode",
]  # fmt: skip
SET_VALUES = [
    "8GiB", "16", "0", "-1", "null", "true", '"text"', "{oops", '{"a": 1, "a": 2}', "NaN", "[1, Infinity]",
    "9" * 5000, "[" * 3000, "[" * 500 + "]" * 500, '{"num_blocks": 4, "allocator": {"kind": "system"}}',
    '{"num_layers": 1, "outer_dim": 1, "page_size": 1, "inner_dim": 1}', "\udcff", "é", "", "1e3", "4.0",
]  # fmt: skip


GOOD_SETTINGS = ["host_layout.size=8MiB", "runtime.worker_id=7", "model.page_size=16", "disk_layout=null"]


def argv(rng: random.Random, root: Path) -> list[str]:
    """A command line: mostly one that could work, with a few things drawn from the wrong side."""

    def file() -> str:
        good = rng.random() < 0.5
        return str(root / rng.choice(["valid.json", "valid.yaml", "valid.toml", "drawn"] if good else FIXED))

    def setting() -> str:
        roll = rng.random()
        if roll < 0.5:
            return rng.choice(GOOD_SETTINGS)
        if roll < 0.55:
            return "no-equals-sign"
        key = rng.choice(SET_KEYS) if roll < 0.85 else spelling(rng, ["host_layout.size", "model.page_size"])
        value = rng.choice(SET_VALUES) if rng.random() < 0.8 else as_json(rng.choice([HUGE, {"k": [1] * 5}, 2**64]))
        return f"{key}={value}"

    command = rng.choice(["validate", "validate", "plan", "plan", "show", "show", "schema", "frobnicate", "--help"])
    args = [command]
    if command == "validate":
        args += [file() for _ in range(rng.randint(1, 3))]
    elif command in ("plan", "show"):
        args.append(file())
    if command in ("schema", "--help", "frobnicate") and rng.random() < 0.8:
        return args
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        args += ["--set", setting()] if rng.random() < 0.8 else [f"--set={setting()}"]
    if rng.random() < 0.3:
        formats = {"plan": ["text", "json"], "show": ["json", "toml"]}.get(command, ["json"])
        args += ["--format", rng.choice(formats) if rng.random() < 0.9 else rng.choice(["yaml", "\udcff"])]
    if rng.random() < 0.2:
        args.append("--sources")
    if rng.random() < 0.7:
        args.append("--no-env")
    if rng.random() < 0.05:
        args.insert(rng.randrange(len(args) + 1), rng.choice(["--unknown", "-x", "--", "--set", "-h", "\udcff"]))
    return args


# ---- checks ----------------------------------------------------------------------------------------------------------

#: The longest message any problem may have: a message names a value, it never holds one.
MESSAGE_BOUND = 1500


def check_error(err: KvbmError) -> None:
    """A KvbmError as every one must be: a ConfigError lists problems, each with a path and a short one-line message;
    a LoadError names its file."""
    text = str(err)
    assert text, f"{type(err).__name__} with no message"
    if isinstance(err, LoadError):
        assert err.root, f"a LoadError that names no file: {text}"
        assert len(err.errors) == 1 and "\n" not in text
    if isinstance(err, ConfigError):
        assert err.errors, "a ConfigError without a problem"
        for path, message in err.errors:
            assert path, f"a problem without a path: {message!r}"
            assert message and "\n" not in message, f"{path}: {message!r}"
            assert len(message) <= MESSAGE_BOUND and len(path) <= MESSAGE_BOUND, f"{path}: {message[:200]}..."
    else:
        assert len(text) <= MESSAGE_BOUND * 4, text[:200]


@contextmanager
def nothing_left(directory: str | None = None) -> Iterator[None]:
    """No descriptor opened (and none closed) by the body, and no new file in ``directory``."""
    fds = open_fds()
    names = set(os.listdir(directory)) if directory else set()
    yield
    assert open_fds() == fds, f"descriptors: {open_fds()} != {fds}"
    if directory:
        assert set(os.listdir(directory)) == names, f"left in {directory}: {set(os.listdir(directory)) - names}"


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with only ``values`` among the DYN_KVBM_* variables, restored after."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("DYN_KVBM_")}
    for key in saved:
        del os.environ[key]
    os.environ.update({k: v for k, v in values.items() if "\0" not in k + v})
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("DYN_KVBM_")]:
            del os.environ[key]
        os.environ.update(saved)
