"""Properties of loading: every config survives a dump, a document and a builder chain agree, bad input only ever
gives a ConfigError whose every entry has a path."""

from __future__ import annotations

import json
import sys
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvbm_builder import ConfigError, KvBlockManagerConfig, KvManagerLayoutConfig, KvManagerModelConfig
from kvbm_builder.config import (
    BlockParallelismStrategy,
    ConsolidatorMode,
    DeviceAllocator,
    DiskAllocator,
    EventSource,
    FullyContiguous,
    KvEventConsolidatorConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    PinnedAllocator,
    PinningMode,
    SystemAllocator,
)
from kvbm_builder.layout import LayoutSpec
from kvbm_builder.loading import dump, load, to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

models = st.builds(
    KvManagerModelConfig,
    num_layers=st.integers(1, 128),
    outer_dim=st.sampled_from([1, 2]),
    page_size=st.integers(1, 256),
    inner_dim=st.integers(1, 16384),
    dtype_width_bytes=st.sampled_from([1, 2, 4, 8]),
)
layout_types = st.sampled_from(
    [FullyContiguous(), LayerSeparate(outer_contiguous=True), LayerSeparate(outer_contiguous=False)]
)
alignments = st.sampled_from([1, 2, 64, 256, 4096, 2**21])


@st.composite
def pinned_allocators(draw: st.DrawFn) -> PinnedAllocator:
    mode = draw(st.sampled_from(list(PinningMode)))
    huge = mode is PinningMode.register and draw(st.booleans())
    return PinnedAllocator(
        device_id=draw(st.integers(0, 15)),
        mode=mode,
        huge_pages=huge,
        numa=not huge and draw(st.booleans()),
        threads=draw(st.none() | st.integers(1, 1024)),
    )


directories = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30)
ALLOCATORS: dict[str, st.SearchStrategy[Any]] = {
    "device_layout": st.builds(DeviceAllocator, device_id=st.integers(0, 15)),
    "host_layout": pinned_allocators() | st.just(SystemAllocator()),
    "disk_layout": st.builds(
        DiskAllocator, directory=directories, o_direct=st.booleans(), zerofill_fallback=st.booleans()
    ),
}


@st.composite
def layouts(draw: st.DrawFn, slot: str, model: KvManagerModelConfig) -> KvManagerLayoutConfig[Any]:
    layout_type, alignment = draw(layout_types), draw(alignments)
    one = LayoutSpec(num_blocks=1, **attrs.asdict(model), layout_type=layout_type, alignment=alignment).block_bytes
    most = max(1, min(2**40, (2**62) // one))  # a tier spans at most 2**63 - 1 bytes
    builder = (
        KvManagerLayoutConfig.builder()
        .num_blocks(draw(st.integers(1, most)))
        .layout_type(layout_type)
        .alignment(alignment)
    )
    if draw(st.booleans()):
        return builder.logical(BlockParallelismStrategy.LeaderWorkerSharded).build()
    return builder.allocator(draw(ALLOCATORS[slot])).build()


consolidators = st.builds(
    KvEventConsolidatorConfig,
    engine_event_endpoint=st.sampled_from(["tcp://localhost:5557", "ipc:///tmp/engine", "tcp://10.0.0.1:7000"]),
    consolidated_event_endpoint=st.sampled_from(["tcp://*:5558", "ipc:///tmp/out"]),
    engine_source=st.sampled_from([EventSource.Vllm, EventSource.Trtllm]),
    mode=st.sampled_from(list(ConsolidatorMode)),
)


@st.composite
def configs(draw: st.DrawFn) -> KvBlockManagerConfig:
    runtime = KvManagerRuntimeConfig.builder().worker_id(draw(st.integers(0, 2**64 - 1)))
    runtime = runtime.disable_nixl() if draw(st.booleans()) else runtime.enable_nixl()
    model = draw(models)
    builder = KvBlockManagerConfig.builder().runtime(runtime.build()).model(model)
    for slot in ("device_layout", "host_layout", "disk_layout"):
        if draw(st.booleans()):
            builder = getattr(builder, slot)(draw(layouts(slot, model)))
    config = builder.build()
    consolidator = draw(st.none() | consolidators)
    return config if consolidator is None else attrs.evolve(config, consolidator_config=consolidator)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_every_config_survives_dump_load_json_and_toml(config: KvBlockManagerConfig) -> None:
    data = dump(config)
    assert load(data) == config
    assert load(json.loads(json.dumps(data))) == config
    if config.runtime.worker_id < 2**63:
        assert load(tomllib.loads(to_toml(data))) == config
    else:  # upstream's worker_id is a u64; TOML 1.0's integers are signed 64-bit
        with pytest.raises(ConfigError, match=r"^runtime\.worker_id is \d+, past the 64-bit integers TOML 1\.0"):
            to_toml(data)


def fits(model: KvManagerModelConfig, num_blocks: int, layout_type: Any, alignment: int) -> bool:
    """Whether a tier of ``num_blocks`` blocks spans at most 2**63 - 1 bytes (LayoutSpec's rule)."""
    try:
        LayoutSpec(num_blocks=num_blocks, **attrs.asdict(model), layout_type=layout_type, alignment=alignment)
    except ConfigError:
        return False
    return True


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(
    model=KvManagerModelConfig(num_layers=1, outer_dim=1, page_size=1, inner_dim=1, dtype_width_bytes=1),
    layout_type=FullyContiguous(),
    alignment=1,
    number=2**33,
    unit="GiB",
)
@given(models, layout_types, alignments, st.integers(0, 2**33), st.sampled_from(["", "B", "GB", "GiB", "MiB", "kb"]))
def test_a_byte_budget_gives_floor_budget_over_padded_block_bytes(
    model: KvManagerModelConfig, layout_type: Any, alignment: int, number: int, unit: str
) -> None:
    units = {"": 1, "B": 1, "GB": 10**9, "GiB": 2**30, "MiB": 2**20, "kb": 10**3}
    budget = number * units[unit]
    table = {"size": f"{number}{unit}", "layout_type": layout_type.to_upstream(), "alignment": alignment}
    doc = {"runtime": {"worker_id": 0}, "model": dump(model), "host_layout": {**table, "allocator": {"kind": "system"}}}
    probe = KvManagerLayoutConfig.builder().num_blocks(1).layout_type(layout_type).alignment(alignment)
    probe = probe.allocator(SystemAllocator())
    block_bytes = LayoutSpec.from_config(model, probe.build()).block_bytes
    if budget < block_bytes:
        with pytest.raises(ConfigError, match=r"\$\.host_layout\.size: .* hold no whole block"):
            load(doc)
    elif not fits(model, budget // block_bytes, layout_type, alignment):
        with pytest.raises(
            ConfigError,
            match=r"\$\.host_layout\.size: holds \d+ blocks of \d+ bytes, more than .*\(2\*\*63 - 1\).*; lower",
        ):
            load(doc)
    else:
        host = load(doc).host_layout
        assert host is not None and host.num_blocks == budget // block_bytes


values = (
    st.integers(-(2**63), 2**64 - 1)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from([1, 2, 4, 8, "2", 2.0])
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(["num_layers", "outer_dim", "page_size", "inner_dim", "dtype_width_bytes"]), values)
)
def test_a_document_and_a_builder_chain_agree(table: dict[str, Any]) -> None:
    """Equal configs, or the same problems (the document's paths start at ``$``, the builder's at ``model``; a
    document lists the values it could not read first)."""
    builder = KvManagerModelConfig.builder()
    for name, value in table.items():
        builder = getattr(builder, name)(value)
    try:
        expected: Any = builder.build()
    except ConfigError as err:
        expected = sorted((path.removeprefix("model"), message) for path, message in err.errors)
    try:
        found: Any = load(table, KvManagerModelConfig)
    except ConfigError as err:
        found = sorted((path.removeprefix("$"), message) for path, message in err.errors)
    assert found == expected


# ---- bad input ------------------------------------------------------------------------------------------------------

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**64)
    | st.floats()
    | st.text()
    | st.sampled_from(
        ["16GiB", "1e999999999GB", "-1GiB", "0.5B", "vllm", "FullyContiguous", "LeaderWorkerSharded", "🦙"]
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=8,
)


def deep(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = {"a": [value]}
    return value


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    doc: Any = dump(draw(configs()))
    for slot in ("host_layout", "disk_layout"):
        if slot in doc and draw(st.booleans()):
            del doc[slot]["num_blocks"]
            doc[slot]["size"] = draw(st.sampled_from(["16GiB", "64GB", "1B", 10**12, "512 MiB"]))
    for _ in range(draw(st.integers(1, 4))):
        table = doc
        path: list[Any] = []
        while isinstance(table, dict) and table and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(table, key=str)))
            if not isinstance(table[key], dict):
                break
            path.append(key)
            table = table[key]
        action = draw(st.sampled_from(["replace", "delete", "add", "deep"]))
        if not isinstance(table, dict):
            continue
        if action == "add" or not table:
            table[draw(st.text(max_size=20) | st.integers())] = draw(junk)
        else:
            key = draw(st.sampled_from(sorted(table, key=str)))
            if action == "delete":
                del table[key]
            elif action == "replace":
                table[key] = draw(junk)
            else:
                table[key] = deep(draw(junk), draw(st.integers(10, 3000)))
    return doc if draw(st.integers(0, 20)) else draw(junk)


# every health check off: they would report on 3000-deep documents by printing them, which overflows the stack
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated())
def test_bad_input_gives_a_valid_config_or_a_config_error_with_a_path_for_each_problem(doc: Any) -> None:
    try:
        config = load(doc)
    except ConfigError as err:
        assert err.problems
        for path, message in err.errors:
            assert path.startswith("$") and message
        assert str(err)
    else:
        assert isinstance(config, KvBlockManagerConfig)
        assert load(dump(config)) == config
