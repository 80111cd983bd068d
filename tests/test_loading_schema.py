"""The JSON Schema of the dict form: generated from the converter's tables, strict about keys, never stricter than
the loader."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm_builder import ConfigError, KvManagerLayoutConfig, KvManagerModelConfig
from kvbm_builder.config import (
    DeviceAllocator,
    DiskAllocator,
    KvEventConsolidatorConfig,
    KvManagerRuntimeConfig,
    PinnedAllocator,
    SystemAllocator,
    Tier,
    parse_size,
)
from kvbm_builder.config.fields import specs
from kvbm_builder.config.sizes import SIZE_PATTERN
from kvbm_builder.loading import json_schema, read_document
from kvbm_builder.loading._converter import CLASS_VIEWS, MANAGER_VIEW, TIER_VIEWS
from kvbm_builder.loading._schema import name_pattern

EXAMPLE = Path(__file__).parent.parent / "examples" / "config.toml"
SCHEMA = json_schema()


def objects(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield node
        for value in node.values():
            yield from objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from objects(value)


def test_it_is_a_draft_2020_12_schema_of_a_kv_block_manager_config() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["$ref"] == "#/$defs/KvBlockManagerConfig"
    assert SCHEMA["$defs"]["KvBlockManagerConfig"]["required"] == ["runtime", "model"]
    assert SCHEMA["$defs"]["Model"]["required"] == ["num_layers", "outer_dim", "page_size", "inner_dim"]


VIEWS = {
    "KvBlockManagerConfig": MANAGER_VIEW,
    "Runtime": CLASS_VIEWS[KvManagerRuntimeConfig],
    "Model": CLASS_VIEWS[KvManagerModelConfig],
    "Consolidator": CLASS_VIEWS[KvEventConsolidatorConfig],
    "DeviceLayout": TIER_VIEWS[Tier.G1],
    "HostLayout": TIER_VIEWS[Tier.G2],
    "DiskLayout": TIER_VIEWS[Tier.G3],
    "Layout": TIER_VIEWS[None],
    **{cls.__name__: CLASS_VIEWS[cls] for cls in (DeviceAllocator, PinnedAllocator, SystemAllocator, DiskAllocator)},
}


def test_every_table_forbids_unknown_keys() -> None:
    found = list(objects(SCHEMA))
    assert len(found) >= len(VIEWS)
    for node in found:
        assert node["additionalProperties"] is False


def test_every_key_the_loader_takes_is_described_and_runtime_objects_are_not() -> None:
    assert set(SCHEMA["$defs"]) == set(VIEWS)
    for name, view in VIEWS.items():
        properties = SCHEMA["$defs"][name]["properties"]
        assert set(view.keys) <= set(properties)
        assert not set(view.runtime_only) & set(properties)
        for key in view.keys:
            assert properties[key]["description"]


def test_the_size_pattern_accepts_every_size_the_loader_accepts() -> None:
    for text in ("16GiB", "16 GB", "0.5TiB", "1e3", "512 mib", "17179869184", " 4kb "):
        assert re.match(SIZE_PATTERN, text)
    assert not re.match(SIZE_PATTERN, "16 gigs")


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.from_regex(
        r"\s?[0-9]{1,4}(\.[0-9]{0,3})?([eE][0-9])?\s?([kKmMgGtT][iI]?[bB]|[bB]|[a-z]{1,3})?\s?", fullmatch=True
    )
)
def test_the_schema_is_never_stricter_than_parse_size(text: str) -> None:
    try:
        parse_size(text)
    except ConfigError:
        return
    assert re.match(SIZE_PATTERN, text)


def test_documents_check_against_it_with_a_json_schema_validator() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (optional: only this test)")
    validator = jsonschema.Draft202012Validator(SCHEMA)
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    example = read_document(EXAMPLE)
    assert list(validator.iter_errors(example)) == []
    for bad in (
        {**example, "extra": 1},
        {**example, "model": {**example["model"], "num_layer": 1}},
        {**example, "host_layout": {**example["host_layout"], "num_blocks": 4}},
        {**example, "host_layout": {**example["host_layout"], "allocator": {"kind": "disk"}}},
        {**example, "runtime": {"worker_id": "0"}},
        {**example, "disk_layout": {**example["disk_layout"], "size": "64 gigs"}},
    ):
        assert list(validator.iter_errors(bad)), bad
    system = {**example, "host_layout": {"num_blocks": 8, "allocator": {"kind": "system"}}}
    sharded = {**example, "disk_layout": {"size": 10**12, "logical": "LeaderWorkerSharded"}}
    assert list(validator.iter_errors(system)) == list(validator.iter_errors(sharded)) == []


@st.composite
def spellings(draw: st.DrawFn, words: tuple[str, ...], style: str) -> str:
    """A spelling its parser accepts: any case; for "words" any `_` or `-`; for "trim" spaces around."""
    word = draw(st.sampled_from(words))
    letters = [ch.upper() if draw(st.booleans()) else ch.lower() for ch in word]
    if style == "words":
        letters = [ch + draw(st.sampled_from(["", "", "_", "-", "__"])) for ch in letters if ch not in "-_"]
    elif style == "trim-dash":
        letters = [draw(st.sampled_from("-_")) if ch in "-_" else ch for ch in letters]
    text = "".join(letters)
    return (
        text if style == "words" else draw(st.sampled_from(["", " ", "\t"])) + text + draw(st.sampled_from(["", " "]))
    )


# every field that may be given by name: the names come from the field's own rule
SPELLED = [
    (cls, name)
    for cls in (KvManagerRuntimeConfig, KvManagerLayoutConfig, KvEventConsolidatorConfig, PinnedAllocator)
    for name, spec in specs(cls).items()
    if spec.rule is not None and "names" in spec.rule.schema
]


# ---- the schema and the loader agree on every spelling, whatever the characters --------------------------------

# letters of the names, the separators the parsers skip, every kind of space (ASCII's, those only Python strips, those
# only ECMA-262 calls spaces), and letters that lower() or casefold() turn into ASCII ones (the Kelvin sign, the long
# s, dotted and dotless i)
ODD = "_- \t\n\x0b\x0c\r\x1c\x1f\x85\xa0\u2003\u2028\ufeff\u212a\u017f\u0130\u0131"


LOOKALIKE = {"k": "\u212a", "K": "\u212a", "s": "\u017f", "S": "\u017f", "i": "\u0131", "I": "\u0130"}


def lookalikes(word: str) -> st.SearchStrategy[str]:
    """``word`` with some letters swapped for look-alikes that str.lower() may turn into ASCII ones."""
    picks = [st.sampled_from([ch, LOOKALIKE[ch]]) if ch in LOOKALIKE else st.just(ch) for ch in word]
    return st.tuples(*picks).map("".join)


def ecma(pattern: str) -> str:
    """``pattern`` as ECMA-262 (JSON Schema) reads it: ``$`` is the end of the text, not also before a last newline."""
    return pattern.replace("$", r"\Z")


@pytest.mark.parametrize(("cls", "name"), SPELLED, ids=lambda v: getattr(v, "__name__", str(v)))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_name_patterns_match_exactly_what_the_fields_accept(cls: Any, name: str, data: st.DataObject) -> None:
    rule = specs(cls)[name].rule
    assert rule is not None
    words, style = rule.schema["names"]
    pattern = name_pattern(words, style)
    letters = "".join(sorted({ch for word in words for ch in word.lower() + word.upper()}))
    text = data.draw(
        spellings(words, style)  # what the parser takes
        | st.from_regex(pattern, fullmatch=True)  # what the pattern takes
        | st.text(alphabet=letters + ODD, min_size=1, max_size=30)  # and what neither may
        | st.builds(
            lambda w, i, ch: w[:i] + ch + w[i:], st.sampled_from(words), st.integers(0, 30), st.sampled_from(ODD)
        )
        | st.sampled_from(words).flatmap(lookalikes)
    )
    loader = rule(attrs.fields_dict(cls)[name].converter(text)) is None
    schema = re.search(ecma(pattern), text) is not None
    assert loader == schema, (text, loader, schema)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.sampled_from(["LayerSeparate", "FullyContiguous", "layer_separate", "Layer-Separate", "fully_contiguous"])
    | st.text(alphabet="layerLAYERsptfuconig_-" + ODD, max_size=20),
    body=st.sampled_from(
        [{"outer_contiguous": True}, {"outer_contiguous": "yes"}, {}, None, [], 0, "", False, {"x": 1}]
    ),
)
def test_the_loader_and_the_schema_accept_the_same_layout_tables(key: str, body: object) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    layout = SCHEMA["$defs"]["HostLayout"]["properties"]["layout_type"]
    try:
        KvManagerLayoutConfig.builder().num_blocks(1).logical("LeaderWorkerSharded").layout_type({key: body}).build()  # type: ignore[arg-type]
    except ConfigError:
        loader = False
    else:
        loader = True
    valid = jsonschema.Draft202012Validator({**layout, "$defs": SCHEMA["$defs"]}).is_valid({key: body})
    # (jsonschema reads patterns with Python's re, whose `$` also matches before a last newline: ECMA-262's does not)
    assert loader == valid or (valid and key.endswith("\n")), (key, body)
