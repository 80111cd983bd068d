"""Hostile input to the loader: files that are no files, files too large, YAML aliases that expand past any bound,
integers of thousands of digits, values nested a thousand deep. Each is one error naming the file or the path,
never a hang, a crash or an exhausted memory."""

from __future__ import annotations

import enum
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest

from kvbm_builder import ConfigError, KvbmError, LoadError, documents
from kvbm_builder.config import KvManagerLayoutConfig, KvManagerModelConfig, SystemAllocator
from kvbm_builder.loading import dump, load, load_file, read_document, resolve, settings_from_env, to_toml

MINIMAL = {"runtime": {"worker_id": 0}, "model": {"num_layers": 1, "outer_dim": 1, "page_size": 1, "inner_dim": 1}}
MINIMAL_YAML = "runtime: {worker_id: 0}\nmodel: {num_layers: 1, outer_dim: 1, page_size: 1, inner_dim: 1}\n"


def fresh(code: str, limit_bytes: int = 2**30, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``code`` in a new interpreter whose address space is capped (a regression exhausts that, not the machine)
    and whose time is bounded (a regression that hangs fails the test instead)."""
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, resource.RLIM_INFINITY))\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def error_in_a_fresh_process(path: Path) -> str:
    """The LoadError of ``load_file(path)`` in a fresh, memory-capped interpreter."""
    done = fresh(f"from kvbm_builder.loading import load_file\nload_file({str(path)!r})")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("kvbm_builder.errors.LoadError: "), done.stderr[-2000:]
    return last.removeprefix("kvbm_builder.errors.LoadError: ")


def load_error(path: str | os.PathLike[str] | bytes) -> str:
    with pytest.raises(LoadError) as caught:
        load_file(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- files that are no regular files, or too large -----------------------------------------------------------------


def test_a_named_pipe_is_refused_at_once_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(load_error(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=30)
    if reader.is_alive():  # it waits for a writer: be one, so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=30)
        pytest.fail("reading a named pipe waited for a writer")
    assert result == [f"{fifo}: is a named pipe (FIFO), not a configuration file; only regular files are read"]


def test_a_device_is_refused_before_a_byte_is_read(tmp_path: Path) -> None:
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")  # reading it whole never ends: refused by what the open file is
    assert error_in_a_fresh_process(zero) == (
        f"{zero}: is a character device, not a configuration file; only regular files are read"
    )


def test_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        assert load_error(path) == f"{path}: is a socket, not a configuration file; only regular files are read"


def test_a_huge_sparse_file_is_refused_by_its_size_without_reading_it(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.json"
    with sparse.open("wb") as file:
        file.truncate(2**40)  # a terabyte that takes no disk
    assert error_in_a_fresh_process(sparse) == (
        f"{sparse}: holds 1024.00 GiB (1099.51 GB); a configuration file may hold at most 65536 bytes "
        "(kvbm_builder.documents.MAX_DOCUMENT_BYTES)"
    )


def test_the_size_cap_names_itself_and_a_file_just_under_it_loads(tmp_path: Path) -> None:
    cap = documents.MAX_DOCUMENT_BYTES
    text = json.dumps(MINIMAL)
    under = tmp_path / "under.json"
    under.write_text(text + " " * (cap - len(text)))
    assert load_file(under).model.num_layers == 1
    over = tmp_path / "over.json"
    over.write_text(text + " " * (cap - len(text) + 1))
    assert load_error(over) == (
        f"{over}: holds {cap + 1} bytes; a configuration file may hold at most {cap} bytes "
        "(kvbm_builder.documents.MAX_DOCUMENT_BYTES)"
    )


def test_a_file_that_says_it_is_empty_but_is_not_is_read_up_to_the_cap_only() -> None:
    # /proc files report size 0 and hold more: read, but never past the cap
    with pytest.raises(LoadError, match=r"^/proc/self/environ: cannot tell the format"):
        read_document("/proc/self/environ")


def test_a_file_name_given_as_bytes_is_read_like_text(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps(MINIMAL))
    assert load_file(os.fsencode(tmp_path / "c.json")) == load(MINIMAL)
    undecodable = os.fsencode(tmp_path) + b"/\xff.json"
    Path(os.fsdecode(undecodable)).write_text(json.dumps(MINIMAL))
    assert load_file(undecodable) == load(MINIMAL)
    assert load_error(os.fsencode(tmp_path) + b"/absent\xff.json") == f"{tmp_path}/absent\udcff.json: no such file"


def test_a_file_name_that_is_no_name_is_a_load_error() -> None:
    with pytest.raises(LoadError, match=r"^a file name must be text, bytes or a path, got 3$"):
        read_document(3)  # type: ignore[arg-type]


def test_a_path_component_past_255_bytes_is_one_line() -> None:
    long = "a" * 300 + ".json"
    assert load_error(long) == f"{long}: cannot be read: File name too long"


# ---- YAML aliases ---------------------------------------------------------------------------------------------------


def laughs(width: int, depth: int, indent: str) -> str:
    """A few hundred bytes of YAML whose aliases stand for ``width ** depth`` values."""
    lines = [f"{indent}a0: &a0 {{" + ", ".join(f"k{i}: 1" for i in range(width)) + "}"]
    lines += [
        f"{indent}a{d}: &a{d} {{" + ", ".join(f"k{i}: *a{d - 1}" for i in range(width)) + "}" for d in range(1, depth)
    ]
    return "\n".join(lines) + "\n"


PLACES = {
    "top": MINIMAL_YAML + "x:\n" + laughs(40, 7, "  "),
    "model": "runtime: {worker_id: 0}\nmodel:\n  num_layers: 1\n  bomb:\n" + laughs(40, 7, "    "),
    "allocator": MINIMAL_YAML + "host_layout:\n  num_blocks: 1\n  allocator:\n" + laughs(40, 7, "    "),
}


@pytest.mark.parametrize("where", list(PLACES))
def test_nested_aliases_are_refused_where_they_are_read_and_never_walked(tmp_path: Path, where: str) -> None:
    # 40**7 values in 2 KB: every command, and resolve(), used to walk them (hours); now refused at once
    path = tmp_path / "laughs.yaml"
    path.write_text(PLACES[where])
    done = fresh(
        f"""
        from kvbm_builder import cli
        for command in ("validate", "plan", "show"):
            print(cli.main([command, {str(path)!r}]))
        """,
        timeout=60,
    )
    expected = (
        f"{path}: is not a configuration: its aliases expand to more than 100000 values "
        "(kvbm_builder.documents.MAX_EXPANDED_VALUES); write the values out instead of nesting aliases"
    )
    assert (done.stdout.split(), done.stderr.splitlines()) == (["2", "2", "2"], [expected] * 3)


def test_a_document_with_shared_tables_is_resolved_without_walking_them() -> None:
    # the same shape built in Python (no YAML involved): resolve() must not walk what the tables share
    shared: dict[str, Any] = {"leaf": 1}
    for _ in range(12):
        shared = {f"k{i}": shared for i in range(40)}
    done = fresh(
        """
        from kvbm_builder import ConfigError
        from kvbm_builder.loading import resolve
        shared = {"leaf": 1}
        for _ in range(12):
            shared = {f"k{i}": shared for i in range(40)}
        document = {"runtime": {"worker_id": 0}, "model": {"num_layers": 1, "outer_dim": 1, "page_size": 1,
                    "inner_dim": 1}, "x": shared}
        try:
            resolve(document, environ={})
        except ConfigError as err:
            print(err)
        """,
        timeout=60,
    )
    assert done.stdout.startswith("$.x: unknown key; expected one of: `runtime`, `model`")


def test_merge_keys_nested_many_times_stay_small(tmp_path: Path) -> None:
    # each level merges the one below twenty times: merged pairs used to multiply (20**7 of them)
    lines = ["a0: &a0 {" + ", ".join(f"k{i}: 1" for i in range(20)) + "}"]
    lines += [f"a{d}: &a{d} {{<<: [{', '.join([f'*a{d - 1}'] * 20)}]}}" for d in range(1, 8)]
    path = tmp_path / "merges.yaml"
    path.write_text("x:\n" + "\n".join("  " + line for line in lines) + "\n")
    done = fresh(
        f"from kvbm_builder.loading import read_document\nprint(len(read_document({str(path)!r})['x']['a7']))",
        timeout=60,
    )
    assert done.stdout.strip() == "20"


def test_an_alias_inside_itself_is_refused(tmp_path: Path) -> None:
    for text in ("x: &a [*a]\n", "x: &a {k: *a}\n", "x: &a [[*a]]\n"):
        path = tmp_path / "cycle.yaml"
        path.write_text(text)
        assert "recursive" in load_error(path) or "cycle" in load_error(path)


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("!!timestamp garbage", "timestamp"),
        ("!!binary aGk=", "binary"),
        ("!!set {a, b}", "set"),
        ("!!omap [{a: 1}]", "omap"),
        ("!!pairs [{a: 1}]", "pairs"),
        ("!!python/name:os.system", "python/name:os.system"),
    ],
)
def test_yaml_tags_of_values_no_configuration_holds_are_refused(tmp_path: Path, value: str, tag: str) -> None:
    # !!timestamp garbage used to raise AttributeError from PyYAML; the others gave sets, bytes, datetimes
    path = tmp_path / "tagged.yaml"
    path.write_text(f"x: {value}\n")
    assert load_error(path) == (
        f"{path}: is not valid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:{tag}' "
        "(line 1, column 4)"
    )


def test_a_map_tag_on_a_list_is_a_yaml_error(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text("x: !!map [1]\n")  # used to raise TypeError
    assert load_error(path) == f"{path}: is not valid YAML: !!map tags a SequenceNode (line 1, column 4)"


def test_a_parsers_long_message_is_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "float.yaml"
    path.write_text("x: !!float " + "z" * 10_000 + "\n")
    message = load_error(path)
    assert message.startswith(f"{path}: is not valid YAML: could not convert string to float: 'zzz")
    assert len(message) < 300


# ---- huge integers --------------------------------------------------------------------------------------------------

HUGE = int("9" * 4299)  # legal in JSON, TOML and YAML; str() of a product of two of them raises ValueError


def test_an_alignment_of_thousands_of_digits_is_refused_with_a_short_message() -> None:
    # a power of two of 14000 bits was a valid alignment: its config could not be repr()ed, and plan crashed
    for build in (
        lambda: KvManagerLayoutConfig.builder().num_blocks(1).logical("LeaderWorkerSharded").alignment(2**14000),
        lambda: KvManagerLayoutConfig.builder().num_blocks(1).allocator(SystemAllocator()).alignment(2**64),
    ):
        with pytest.raises(ConfigError) as caught:
            build().build()
        [(path, message)] = caught.value.errors
        assert path == "layout.alignment" and message.startswith("must be a power of two (1, 2, 4, ... 2**63), got")
        assert len(message) < 120


def test_every_valid_config_can_be_shown_whatever_its_values() -> None:
    config = load({"runtime": {"worker_id": 2**64 - 1}, "model": {**MINIMAL["model"], "num_layers": 2**64 - 1}})
    assert "worker_id=18446744073709551615" in repr(config)
    layout = KvManagerLayoutConfig.builder().num_blocks(2**64 - 1).logical("LeaderWorkerSharded").alignment(2**63)
    assert "alignment=9223372036854775808" in repr(layout.build())
    # a field without a rule (upstream reserves it) may hold anything: even so its config shows itself, briefly
    held = attrs.evolve(config, block_reset_channel=HUGE * HUGE)
    assert "block_reset_channel=an integer of 28562 bits" in repr(held)


def test_a_builder_holding_a_huge_integer_can_be_shown() -> None:
    builder = KvManagerModelConfig.builder().num_layers(HUGE * HUGE)
    assert repr(builder) == "KvManagerModelConfigBuilder(num_layers=an integer of 28562 bits)"


@pytest.mark.parametrize(
    ("table", "path", "message"),
    [
        ({"size": HUGE}, "$.host_layout.size", "holds more than 2**64 blocks of 2 bytes, more than the"),
        ({"num_blocks": HUGE}, "$.host_layout.num_blocks", "must be <= 18446744073709551615, got an integer of"),
        ({"num_blocks": 1, "alignment": 2**14000}, "$.host_layout.alignment", "must be a power of two"),
    ],
)
def test_a_huge_integer_in_a_file_is_a_short_problem_with_its_path(
    tmp_path: Path, table: dict[str, Any], path: str, message: str
) -> None:
    # `size` used to raise IndexError; `alignment` validated and then crashed plan with str() of its product
    file = tmp_path / "huge.json"
    file.write_text(json.dumps({**MINIMAL, "host_layout": {**table, "allocator": {"kind": "system"}}}))
    with pytest.raises(ConfigError) as caught:
        resolve(read_document(file), environ={})
    [(where, said)] = caught.value.errors
    assert where == path and said.startswith(message) and len(said) < 300


def test_an_index_of_thousands_of_digits_is_a_short_layout_error() -> None:
    from kvbm_builder.errors import LayoutIndexError
    from kvbm_builder.layout import LayoutSpec

    spec = LayoutSpec.from_config(
        load(MINIMAL).model, KvManagerLayoutConfig.builder().num_blocks(2).logical("LeaderWorkerSharded").build()
    )
    with pytest.raises(LayoutIndexError, match=r"^block index an integer of 14281 bits \(int\) is out of range"):
        spec.offset(HUGE, 0, 0)


# ---- values nested a thousand deep ------------------------------------------------------------------------------


def nested(depth: int, leaf: object = "pinned") -> object:
    value: object = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [900, 1000, 5000])
def test_a_value_nested_a_thousand_deep_is_a_problem_with_its_path(depth: int) -> None:
    document = {**MINIMAL, "host_layout": {"num_blocks": 1, "allocator": {"kind": nested(depth)}}}
    for read in (load, lambda d: resolve(d, environ={}).config):
        with pytest.raises(ConfigError) as caught:
            read(document)
        assert caught.value.errors == [
            ("$.host_layout.allocator.kind", "must be pinned or system, got [[[...]]] (list)")
        ]


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_a_file_nested_too_deeply_for_its_parser_is_a_load_error(tmp_path: Path, suffix: str) -> None:
    deep = "[" * 3000 + "]" * 3000
    path = tmp_path / f"deep{suffix}"
    text = {".json": f'{{"x": {deep}}}', ".toml": f"x = {deep}\n", ".yaml": f"x: {deep}\n"}[suffix]
    path.write_text(text)
    assert load_error(path).endswith("nested too deeply")


# ---- smaller: int subclasses, counts, TOML's integers, objects that raise ----------------------------------------


class Layers(enum.IntEnum):
    FOUR = 4


def test_an_int_subclass_is_kept_as_the_plain_int_it_holds() -> None:
    for model in (
        load({**MINIMAL, "model": {**MINIMAL["model"], "num_layers": Layers.FOUR}}).model,
        KvManagerModelConfig.builder().num_layers(Layers.FOUR).outer_dim(1).page_size(1).inner_dim(1).build(),
        attrs.evolve(load(MINIMAL).model, num_layers=Layers.FOUR),
    ):
        assert type(model.num_layers) is int and model.num_layers == 4
        assert repr(model).startswith("KvManagerModelConfig(num_layers=4,")


def test_a_str_subclass_is_kept_as_the_plain_str_it_holds() -> None:
    class Loud(str):
        def __eq__(self, other: object) -> bool:
            raise RuntimeError("compared")

        __hash__ = str.__hash__

    from kvbm_builder.config import DiskAllocator

    assert type(DiskAllocator(directory=Loud("/var/tmp")).directory) is str


@pytest.mark.parametrize("text", ["4.0", "1e3", " 4", "0x4", "4_0"])
@pytest.mark.parametrize(
    "variable",
    [
        "DYN_KVBM_MAX_CONCURRENT_TRANSFERS",
        "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE",
        "DYN_KVBM_METRICS_PORT",
        "DYN_KVBM_CACHE_STATS_MAX_REQUESTS",
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS",
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS",
    ],
)
def test_every_count_variable_refuses_what_is_no_whole_number(variable: str, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(MINIMAL, environ={variable: text})
    [(path, message)] = caught.value.errors
    assert path == f"$env.{variable}" and message.startswith("must be a ") and message.endswith(f"got {text!r}")
    if variable.startswith("DYN_KVBM_MAX"):
        with pytest.raises(ConfigError):
            settings_from_env({variable: text})


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**64 - 1])
def test_toml_is_never_written_with_integers_past_64_bits(value: int) -> None:
    with pytest.raises(ConfigError, match=rf"^a\.b\[1\] is {value}, past the 64-bit integers TOML 1\.0 can write"):
        to_toml({"a": {"b": [0, value]}})
    assert to_toml({"a": 2**63 - 1}) == "a = 9223372036854775807\n"


def test_a_worker_id_past_63_bits_dumps_to_json_but_not_toml() -> None:
    config = load({**MINIMAL, "runtime": {"worker_id": 2**64 - 1}})
    assert load(json.loads(json.dumps(dump(config)))) == config
    with pytest.raises(ConfigError, match=r"^runtime\.worker_id is 18446744073709551615, past the 64-bit"):
        to_toml(dump(config))


class Raises:
    """A caller's object every method of which raises."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no {name}")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no eq")

    def __hash__(self) -> int:
        raise RuntimeError("no hash")

    def __len__(self) -> int:
        raise RuntimeError("no len")


class Numberish(int):
    def __le__(self, other: object) -> bool:
        raise RuntimeError("no le")

    __ge__ = __lt__ = __gt__ = __eq__ = __le__  # type: ignore[assignment]
    __hash__ = int.__hash__


class Wordish(str):
    def lower(self) -> str:
        raise RuntimeError("no lower")

    strip = isascii = lower  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("setter", "value"),
    [
        ("offload_filter", Raises()),
        ("allocator", Raises()),
        ("storage", [Raises()]),
        ("layout_type", Wordish("FullyContiguous")),
        ("layout_type", Raises()),
        ("num_blocks", Numberish(4)),
        ("alignment", Numberish(4)),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_a_value_whose_methods_raise_is_a_config_error_of_its_field(setter: str, value: object) -> None:
    builder = KvManagerLayoutConfig.builder().num_blocks(1)
    builder = builder.allocator(SystemAllocator()) if setter not in ("allocator", "storage") else builder
    getattr(builder, setter)(value)
    assert "<" in repr(builder) or "4" in repr(builder) or "Full" in repr(builder)  # never raises
    try:
        built = builder.build()
    except ConfigError as err:
        assert isinstance(err, KvbmError) and err.errors[0][0].startswith("layout.")
    else:  # an int or str subclass holding a good value is that plain value
        assert type(getattr(built, setter)) in (int, type(built.layout_type))
