"""Configuration files: JSON, TOML and YAML by suffix; anything unreadable is one line naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvbm_builder import ConfigError, KvbmError, LoadError
from kvbm_builder.config import DiskAllocator, PinnedAllocator
from kvbm_builder.loading import dump, load, load_file, read_document, to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE = Path(__file__).parent.parent / "examples" / "config.toml"


def test_the_example_is_a_realistic_valid_config() -> None:
    config = load_file(EXAMPLE)
    assert [tier.name for tier, _ in config.tiers()] == ["G1", "G2", "G3"]
    assert config.model.bytes_per_block == 4 * 2**20
    assert config.host_layout is not None and config.host_layout.num_blocks == 4096  # 16 GiB
    assert config.disk_layout is not None and config.disk_layout.num_blocks == 32 * 10**9 // 2**22  # 32 GB


def test_the_same_document_in_json_toml_and_yaml_gives_the_same_config(tmp_path: Path) -> None:
    document = read_document(EXAMPLE)
    (tmp_path / "c.json").write_text(json.dumps(document))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(document))
    (tmp_path / "c.YML").write_text(yaml.safe_dump(document))
    (tmp_path / "c.toml").write_text(to_toml(document))
    expected = load(document)
    for name in ("c.json", "c.yaml", "c.YML", "c.toml"):
        assert load_file(tmp_path / name) == expected


def load_error(path: Path) -> str:
    with pytest.raises(LoadError) as caught:
        load_file(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert isinstance(caught.value, KvbmError)
    return message[len(f"{path}: ") :]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.ini", "[runtime]", "cannot tell the format from the suffix '.ini'; name it .json, .toml or .yaml"),
        ("c.toml", "", "is empty; a configuration needs at least the `runtime` and `model` tables (TOML)"),
        ("c.json", "  \n", "is empty; a configuration needs at least the `runtime` and `model` tables (JSON)"),
        (
            "c.json",
            "{'runtime': 1}",
            "is not valid JSON: Expecting property name enclosed in double quotes (line 1, column 2)",
        ),
        ("c.json", '{"a": 1, "a": 2}', "is not valid JSON: duplicate key 'a'"),
        ("c.json", '{"a": NaN}', "is not valid JSON: NaN is not a number JSON allows"),
        ("c.json", "[1, 2]", "holds a list, not a table of keys and values (JSON)"),
        ("c.json", "[" * 20_000 + "]" * 20_000, "is not valid JSON: nested too deeply"),
        ("c.toml", "runtime = \nmodel = 1\n", "is not valid TOML: Invalid value (at line 1, column 11)"),
        ("c.yaml", "a: [1", "is not valid YAML: expected ',' or ']', but got '<stream end>' (line 1, column 6)"),
        ("c.yaml", "a: 1\na: 2\n", "is not valid YAML: duplicate key 'a' (line 2, column 1)"),
        ("c.yaml", "a: 1\n---\nb: 2\n", "holds 2 YAML documents; a configuration is exactly one"),
        ("c.yaml", "- 1\n", "holds a list, not a table of keys and values (YAML)"),
        ("c.yaml", "!!python/object:os.system {}", "is not valid YAML: "),
    ],
)
def test_a_file_that_is_not_a_document(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert load_error(path).startswith(message)


def test_missing_files_directories_and_bytes_that_are_not_text(tmp_path: Path) -> None:
    assert load_error(tmp_path / "absent.toml") == "no such file"
    (tmp_path / "dir.json").mkdir()
    assert load_error(tmp_path / "dir.json") == "is a directory, not a configuration file"
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    assert load_error(tmp_path / "bin.toml") == "is not UTF-8 text (byte 0)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text("[runtime]\n")
    path.chmod(0)
    assert load_error(path) == "cannot be read: Permission denied"


def test_yaml_without_pyyaml_says_how_to_get_it(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("runtime: {}\n")
    script = (
        "import sys; sys.modules['yaml'] = None\nfrom kvbm_builder.loading import load_file\nload_file(sys.argv[1])"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=False)
    assert f"LoadError: {path}: is YAML, which needs PyYAML: pip install 'kvbm-builder[yaml]'" in result.stderr


def test_a_readable_document_that_is_not_a_valid_config_has_document_paths(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[runtime]\nworker_id = 0\n[model]\nnum_layers = 0\nouter_dim = 2\npage_size = 1\ninner_dim = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    assert not isinstance(caught.value, LoadError)
    assert caught.value.errors == [("$.model.num_layers", "must be >= 1, got 0")]


# ---- writing TOML ---------------------------------------------------------------------------------------------------

scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(st.characters(codec="utf-8"))
    | st.floats(allow_nan=False)
)
tables = st.recursive(
    st.dictionaries(st.text(st.characters(codec="utf-8"), min_size=1, max_size=8), scalars, max_size=4),
    lambda inner: st.dictionaries(
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=8), inner | scalars, max_size=4
    ),
    max_leaves=12,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables)
@example({"0\n": False, "t": {"a\n": {}}})  # keys that end in a newline must be quoted
def test_to_toml_writes_what_tomllib_reads_back(data: dict[str, Any]) -> None:
    assert tomllib.loads(to_toml(data)) == data


def test_to_toml_writes_sections_and_upstreams_layout_inline() -> None:
    text = to_toml(dump(load_file(EXAMPLE)), {"host_layout.num_blocks": "file"})
    assert "[host_layout.allocator]\n" in text
    assert "num_blocks = 4096  # file\n" in text
    layered = to_toml({"t": {"layout_type": {"LayerSeparate": {"outer_contiguous": True}}}})
    assert tomllib.loads(layered) == {"t": {"layout_type": {"LayerSeparate": {"outer_contiguous": True}}}}
    quoted = to_toml({"a b": {"c.d": 1}}, {"a b.c.d": "file"})
    assert quoted.splitlines()[-1] == '"c.d" = 1  # file'


def test_toml_has_no_null() -> None:
    with pytest.raises(ConfigError, match=r"disk_layout\.logical is null, which TOML cannot write; use JSON"):
        to_toml({"disk_layout": {"num_blocks": 1, "logical": None}})


# ---- review 2 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["huge.toml", "huge.yaml", "huge.json"])
def test_an_integer_python_cannot_read_is_a_load_error_naming_the_file(tmp_path: Path, name: str) -> None:
    digits = "9" * 5000
    text = {".toml": f"[model]\nnum_layers = {digits}\n", ".yaml": f"model:\n  num_layers: {digits}\n"}
    path = tmp_path / name
    path.write_text(text.get(path.suffix, f'{{"model": {{"num_layers": {digits}}}}}'))
    assert load_error(path).startswith(f"is not valid {path.suffix[1:].upper()}: ")


def test_a_file_name_with_a_nul_byte_is_a_load_error() -> None:
    with pytest.raises(LoadError, match="contains a NUL byte"):
        load_file("a\x00.json")


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_a_byte_order_mark_is_allowed_in_every_format(tmp_path: Path, suffix: str) -> None:
    data = dump(load_file(EXAMPLE))
    text = {".json": json.dumps(data), ".toml": to_toml(data), ".yaml": yaml.safe_dump(data)}[suffix]
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_file(path) == load_file(EXAMPLE)


MERGED = """\
runtime: {worker_id: 0}
model: {num_layers: 2, outer_dim: 2, page_size: 4, inner_dim: 8}
host_layout: &tier
  num_blocks: 16
  allocator: {kind: system}
disk_layout:
  <<: *tier
  allocator: {kind: disk, directory: /var/tmp}
"""


def test_yaml_merge_keys_are_overridden_by_the_mappings_own(tmp_path: Path) -> None:
    path = tmp_path / "merged.yaml"
    path.write_text(MERGED)
    disk = load_file(path).disk_layout
    assert disk is not None and disk.num_blocks == 16 and disk.allocator == DiskAllocator(directory="/var/tmp")
    path.write_text(MERGED + "  allocator: {kind: disk}\n")
    assert "duplicate key 'allocator'" in load_error(path)


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("huge_pages: yes", "$.host_layout.allocator.huge_pages", "must be true or false, got 'yes' (str)"),
        ("numa: On", "$.host_layout.allocator.numa", "must be true or false, got 'On' (str)"),
        ("mode: 1:30", "$.host_layout.allocator.mode", "must be 'register' or 'host_alloc', got '1:30' (str)"),
        ("threads: 0o17", None, None),
        ("threads: 010", None, None),
        ("threads: 1_0", "$.host_layout.allocator.threads", "must be an integer, got '1_0' (str)"),
    ],
)
def test_yaml_scalars_are_read_by_yaml_1_2s_core_schema(
    tmp_path: Path, text: str, path: str | None, message: str | None
) -> None:
    file = tmp_path / "core.yaml"
    file.write_text(
        "runtime: {worker_id: 0}\nmodel: {num_layers: 2, outer_dim: 2, page_size: 4, inner_dim: 8}\n"
        f"host_layout: {{num_blocks: 1, allocator: {{kind: pinned, {text}}}}}\n"
    )
    if path is None:
        host = load_file(file).host_layout
        assert host is not None and host.allocator == PinnedAllocator(threads=15 if "0o" in text else 10)
    else:
        with pytest.raises(ConfigError) as caught:
            load_file(file)
        assert caught.value.errors == [(path, message)]
