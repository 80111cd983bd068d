"""The DYN_KVBM_* variables, explicit arguments, and where every value of a resolved configuration came from."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm_builder import (
    ConfigError,
    KvBlockManagerConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    UninitializedFieldError,
)
from kvbm_builder.config import DiskAllocator, PinnedAllocator, SystemAllocator
from kvbm_builder.loading import KvbmSettings, cache_sizes_from_env, from_env, load, resolve, settings_from_env

# upstream's example: 28 layers, outer 2, page 16, inner 1024, 2 bytes = 1,835,008 bytes per block
MODEL = {"num_layers": 28, "outer_dim": 2, "page_size": 16, "inner_dim": 1024}


def doc(**tables: Any) -> dict[str, Any]:
    return {"runtime": {"worker_id": 0}, "model": dict(MODEL), **tables}


def problems(document: Any = None, environ: dict[str, str] | None = None, **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        resolve(doc() if document is None else document, environ=environ or {}, **kwargs)
    return caught.value.errors


def test_the_cpu_cache_variable_creates_a_pinned_host_tier_sized_as_upstream_sizes_it() -> None:
    config = resolve(doc(), environ={"DYN_KVBM_CPU_CACHE_GB": "4"}).config
    assert config.host_layout is not None
    assert config.host_layout.num_blocks == 2179
    assert config.host_layout.allocator == PinnedAllocator()


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 10**6).map(lambda n: str(n / 1000)), st.sampled_from([1, 2]), st.integers(1, 64))
def test_gb_sizing_equals_tier_blocks_from_env_at_alignment_1(gb: str, outer_dim: int, num_layers: int) -> None:
    model = {**MODEL, "outer_dim": outer_dim, "num_layers": num_layers}
    environ = {"DYN_KVBM_CPU_CACHE_GB": gb, "DYN_KVBM_DISK_CACHE_GB": gb}
    try:
        expected = cache_sizes_from_env(KvManagerModelConfig(**model), environ)
    except ConfigError:  # less than one block
        with pytest.raises(ConfigError, match="hold no whole block"):
            resolve({**doc(), "model": model}, environ=environ)
    else:
        config = resolve({**doc(), "model": model}, environ=environ).config
        assert config.host_layout is not None and config.disk_layout is not None
        assert (config.host_layout.num_blocks, config.disk_layout.num_blocks) == (
            expected.cpu_blocks,
            expected.disk_blocks,
        )


def test_an_override_wins_over_gb_and_over_the_file() -> None:
    environ = {"DYN_KVBM_DISK_CACHE_GB": "8", "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "100"}
    config = resolve(doc(disk_layout={"size": "1TB", "allocator": {}}), environ=environ).config
    assert config.disk_layout is not None and config.disk_layout.num_blocks == 100


def test_zero_or_empty_means_unset_and_the_file_stays() -> None:
    config = resolve(doc(host_layout={"num_blocks": 7, "allocator": {}}), environ={"DYN_KVBM_CPU_CACHE_GB": "0"}).config
    assert config.host_layout is not None and config.host_layout.num_blocks == 7
    assert resolve(doc(), environ={"DYN_KVBM_CPU_CACHE_GB": ""}).config.host_layout is None


def test_the_environment_keeps_the_files_layout_and_allocator() -> None:
    table = {"num_blocks": 7, "alignment": 4096, "allocator": {"kind": "system"}}
    config = resolve(doc(host_layout=table), environ={"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "9"}).config
    assert config.host_layout is not None
    assert (config.host_layout.num_blocks, config.host_layout.alignment) == (9, 4096)
    assert config.host_layout.allocator == SystemAllocator()


def test_disk_variables_set_the_disk_allocator() -> None:
    environ = {
        "DYN_KVBM_DISK_CACHE_GB": "64",
        "DYN_KVBM_DISK_CACHE_DIR": "/mnt/nvme",
        "DYN_KVBM_DISK_DISABLE_O_DIRECT": "1",
        "DYN_KVBM_DISK_ZEROFILL_FALLBACK": "true",
    }
    config = resolve(doc(), environ=environ).config
    assert config.disk_layout is not None
    assert config.disk_layout.allocator == DiskAllocator(directory="/mnt/nvme", o_direct=False, zerofill_fallback=True)


def test_allocator_variables_act_only_on_a_tier_with_an_allocator() -> None:
    environ = {"DYN_KVBM_DISK_CACHE_DIR": "/mnt/nvme", "DYN_KVBM_USE_HUGE_PAGES": "1"}
    assert resolve(doc(), environ=environ).config.tiers() == []
    sharded = doc(disk_layout={"num_blocks": 1, "logical": "LeaderWorkerSharded"})
    assert resolve(sharded, environ=environ).config.disk_layout == load(sharded).disk_layout


def test_huge_pages_and_numa_come_from_yes_no_variables() -> None:
    table = {"num_blocks": 8, "allocator": {"huge_pages": True}}
    config = resolve(
        doc(host_layout=table), environ={"DYN_KVBM_USE_HUGE_PAGES": "0", "DYN_KVBM_ENABLE_NUMA": "1"}
    ).config
    assert config.host_layout is not None
    assert config.host_layout.allocator == PinnedAllocator(huge_pages=False, numa=True)


def test_a_bad_value_names_its_variable_and_all_are_reported_together() -> None:
    environ = {
        "DYN_KVBM_CPU_CACHE_GB": "lots",
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "1.5",
        "DYN_KVBM_USE_HUGE_PAGES": "maybe",
        "DYN_KVBM_METRICS_PORT": "70000",
    }
    assert problems(environ=environ) == [
        ("$env.DYN_KVBM_CPU_CACHE_GB", "must be a non-negative number, such as 4 or 0.5, got 'lots'"),
        ("$env.DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "must be a whole number of blocks, got '1.5'"),
        ("$env.DYN_KVBM_USE_HUGE_PAGES", "must be 1, true, yes, on or 0, false, no, off; got 'maybe' (str)"),
        ("$env.DYN_KVBM_METRICS_PORT", "must be a port number 1..65535, got 70000"),
    ]


@pytest.mark.parametrize("value", ["false", "0", "off", ""])
def test_a_present_flag_set_to_false_is_refused_because_upstream_would_turn_it_on(value: str) -> None:
    [(path, message)] = problems(
        doc(disk_layout={"num_blocks": 1, "allocator": {}}), {"DYN_KVBM_DISK_DISABLE_O_DIRECT": value}
    )
    assert path == "$env.DYN_KVBM_DISK_DISABLE_O_DIRECT"
    assert "unset it to keep it off" in message


def test_a_problem_with_a_value_a_variable_set_is_shown_under_the_variable() -> None:
    assert problems(environ={"DYN_KVBM_CPU_CACHE_GB": "0.001"}) == [
        (
            "$env.DYN_KVBM_CPU_CACHE_GB",
            "1000000 bytes hold no whole block of 1835008 bytes; raise it, or give num_blocks "
            "(it sets $.host_layout.size)",
        )
    ]
    [(path, _)] = problems(
        environ={"DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_USE_HUGE_PAGES": "1", "DYN_KVBM_ENABLE_NUMA": "1"}
    )
    assert path == "$env.DYN_KVBM_ENABLE_NUMA"


def test_huge_pages_need_a_pinned_allocator() -> None:
    table = {"num_blocks": 8, "allocator": {"kind": "system"}}
    assert problems(doc(host_layout=table), {"DYN_KVBM_USE_HUGE_PAGES": "1"}) == [
        (
            "$env.DYN_KVBM_USE_HUGE_PAGES",
            "asks for huge_pages, but host_layout's allocator is 'system' (str); use kind 'pinned'",
        )
    ]


def test_document_problems_keep_their_paths_beside_the_environments() -> None:
    bad = {**doc(), "model": {**MODEL, "page_size": 0}}
    assert problems(bad, {"DYN_KVBM_METRICS": "sometimes"}) == [
        ("$env.DYN_KVBM_METRICS", "must be 1, true, yes, on or 0, false, no, off; got 'sometimes' (str)"),
        ("$.model.page_size", "must be >= 1, got 0"),
    ]


# ---- explicit arguments and sources ---------------------------------------------------------------------------------


def test_arguments_win_over_the_environment_and_the_file() -> None:
    resolved = resolve(
        doc(host_layout={"num_blocks": 10, "allocator": {}}, disk_layout={"num_blocks": 1, "allocator": {}}),
        environ={"DYN_KVBM_CPU_CACHE_GB": "4"},
        overrides={"host_layout.size": "8GiB", "model.page_size": 32, "disk_layout": None},
    )
    assert resolved.config.host_layout is not None
    assert resolved.config.host_layout.num_blocks == 8 * 2**30 // (28 * 2 * 32 * 1024 * 2)
    assert resolved.config.disk_layout is None
    assert resolved.sources["model.page_size"] == "argument"
    assert resolved.sources["host_layout.num_blocks"] == "argument, from size = '8GiB'"


def test_an_argument_is_a_dotted_path() -> None:
    assert problems(overrides={"host_layout..size": 1}) == [
        ("$arg.'host_layout..size'", "must be a dotted path such as 'host_layout.size'")
    ]


def test_an_argument_through_a_value_is_named_by_a_short_path_whatever_its_length() -> None:
    [(path, message)] = problems(overrides={"model.num_layers." + "y" * 100_000: 1})

    assert path.startswith("$arg.'model.num_layers.yyy") and "..." in path and len(path) < 80
    assert message.startswith("cannot set a value inside model.num_layers: it is 28, not a table")


def test_sources_name_the_layer_of_every_value() -> None:
    document = doc(host_layout={"size": "16GiB", "layout_type": "layer_separate_outer_contiguous", "allocator": {}})
    sources = resolve(document, environ={"DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "50"}, origin="config.toml").sources
    assert sources == {
        "runtime.worker_id": "config.toml",
        "runtime.nixl": "default",
        "model.num_layers": "config.toml",
        "model.outer_dim": "config.toml",
        "model.page_size": "config.toml",
        "model.inner_dim": "config.toml",
        "model.dtype_width_bytes": "default",
        "host_layout.num_blocks": "config.toml, from size = '16GiB'",
        "host_layout.layout_type.LayerSeparate.outer_contiguous": "config.toml",
        "host_layout.alignment": "default",
        "host_layout.allocator.kind": "default",
        "host_layout.allocator.device_id": "default",
        "host_layout.allocator.mode": "default",
        "host_layout.allocator.huge_pages": "default",
        "host_layout.allocator.numa": "default",
        "disk_layout.num_blocks": "env DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS",
        "disk_layout.layout_type": "default",
        "disk_layout.alignment": "default",
        "disk_layout.allocator.kind": "env DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS",
        "disk_layout.allocator.directory": "default",
        "disk_layout.allocator.o_direct": "default",
        "disk_layout.allocator.zerofill_fallback": "default",
    }


# ---- settings without a config field --------------------------------------------------------------------------------


def test_settings_default_as_upstream() -> None:
    assert settings_from_env({}) == KvbmSettings(
        metrics=False,
        metrics_port=6880,
        max_concurrent_transfers=4,
        max_transfer_batch_size=16,
        disk_offload_filter=True,
        cache_stats_max_requests=1000,
    )


def test_settings_from_the_environment() -> None:
    environ = {
        "DYN_KVBM_METRICS": "true",
        "DYN_KVBM_METRICS_PORT": "9100",
        "DYN_KVBM_MAX_CONCURRENT_TRANSFERS": "8",
        "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "64",
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1",
        "DYN_KVBM_CACHE_STATS_MAX_REQUESTS": "500",
    }
    assert settings_from_env(environ) == KvbmSettings(
        metrics=True,
        metrics_port=9100,
        max_concurrent_transfers=8,
        max_transfer_batch_size=64,
        disk_offload_filter=False,
        cache_stats_max_requests=500,
    )
    assert resolve(doc(), environ=environ).settings == settings_from_env(environ)


# ---- from_env -------------------------------------------------------------------------------------------------------


class Events:
    def on_store(self, event: object) -> None: ...

    def on_remove(self, event: object) -> None: ...


class Always:
    def should_offload(self, sequence_hash: int) -> bool:
        return True


def test_from_env_on_a_document_is_resolve_without_arguments() -> None:
    environ = {"DYN_KVBM_CPU_CACHE_GB": "4"}
    assert from_env(environ, doc()) == resolve(doc(), environ=environ).config


def test_from_env_on_a_built_config_rebuilds_only_the_tiers_it_touches() -> None:
    built = load(doc(host_layout={"num_blocks": 10, "allocator": {}}))
    assert built.host_layout is not None
    built = attrs.evolve(
        built, event_manager=Events(), host_layout=attrs.evolve(built.host_layout, offload_filter=Always())
    )
    config = from_env(
        {"DYN_KVBM_CPU_CACHE_GB": "4", "DYN_KVBM_DISK_CACHE_GB": "8", "DYN_KVBM_DISK_CACHE_DIR": "/x"}, built
    )
    assert config.host_layout is not None and config.disk_layout is not None
    assert config.host_layout.num_blocks == 2179
    assert isinstance(config.host_layout.offload_filter, Always)
    assert isinstance(config.event_manager, Events)
    assert config.runtime is built.runtime
    assert config.disk_layout.allocator == DiskAllocator(directory="/x")
    assert from_env({}, built) is built


def test_a_rebuilt_tier_keeps_its_offload_filter_and_its_allocators_progress_callback() -> None:
    def progress(done: int, total: int) -> None: ...

    host = (
        KvManagerLayoutConfig.builder()
        .num_blocks(10)
        .allocator(PinnedAllocator(threads=3, progress=progress))
        .offload_filter(Always())
        .build()
    )
    built = attrs.evolve(load(doc()), host_layout=host)
    for environ in ({"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "8"}, {"DYN_KVBM_USE_HUGE_PAGES": "1"}):
        config = from_env(environ, built)
        assert config.host_layout is not None and config.host_layout != built.host_layout
        allocator = config.host_layout.allocator
        assert isinstance(allocator, PinnedAllocator)
        assert allocator.progress is progress
        assert allocator.threads == 3
        assert isinstance(config.host_layout.offload_filter, Always)


def test_from_env_cannot_resize_a_tier_of_given_storage() -> None:
    class Region:
        kind, addr, size = PinnedAllocator.storage_kind, 0, 1 << 30

    built = load(doc())
    given_memory = attrs.evolve(built, host_layout=_layout_on(Region()))
    with pytest.raises(ConfigError) as caught:
        from_env({"DYN_KVBM_CPU_CACHE_GB": "4"}, given_memory)
    [(path, message)] = caught.value.errors
    assert path == "$env.DYN_KVBM_CPU_CACHE_GB"
    assert message == (
        "cannot resize a tier whose memory was given as `storage`; unset the variable (it sets $.host_layout.size)"
    )


def test_from_env_names_the_variable_behind_an_allocator_problem_as_resolve_does() -> None:
    environ = {"DYN_KVBM_USE_HUGE_PAGES": "1", "DYN_KVBM_ENABLE_NUMA": "1"}
    document = doc(host_layout={"num_blocks": 10, "allocator": {}})
    with pytest.raises(ConfigError) as from_document:
        resolve(document, environ=environ)
    with pytest.raises(ConfigError) as from_built:
        from_env(environ, load(document))

    assert from_built.value.errors == from_document.value.errors
    [(path, message)] = from_built.value.errors
    assert path == "$env.DYN_KVBM_ENABLE_NUMA"
    assert message.startswith("huge_pages and numa cannot both be on")
    assert message.endswith("(it sets $.host_layout.allocator.numa)")


def _layout_on(region: object) -> Any:
    return KvManagerLayoutConfig.builder().num_blocks(1).storage([region]).build()


def test_from_env_of_nothing_says_what_is_missing() -> None:
    with pytest.raises(ConfigError) as caught:
        from_env({"DYN_KVBM_CPU_CACHE_GB": "4"})
    assert caught.value.errors == [("$.runtime", "must be initialized"), ("$.model", "must be initialized")]
    assert isinstance(from_env({}, doc()), KvBlockManagerConfig)


# ---- review 2 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["DISK", " Disk "])
def test_the_disk_variables_act_on_a_disk_allocator_however_its_kind_is_spelled(kind: str) -> None:
    document = doc(disk_layout={"num_blocks": 4, "allocator": {"kind": kind}})
    environ = {"DYN_KVBM_DISK_CACHE_DIR": "/var/tmp", "DYN_KVBM_DISK_ZEROFILL_FALLBACK": "1"}
    disk = resolve(document, environ=environ).config.disk_layout
    assert disk is not None and disk.allocator == DiskAllocator(directory="/var/tmp", zerofill_fallback=True)


def test_huge_pages_act_on_a_pinned_allocator_however_its_kind_is_spelled() -> None:
    document = doc(host_layout={"num_blocks": 4, "allocator": {"kind": "Pinned"}})
    host = resolve(document, environ={"DYN_KVBM_USE_HUGE_PAGES": "1"}).config.host_layout
    assert host is not None and host.allocator == PinnedAllocator(huge_pages=True)


@pytest.mark.parametrize("tier", [["garbage"], "garbage", 3])
def test_a_variable_never_hides_a_tier_that_is_not_a_table(tier: object) -> None:
    [(path, message)] = problems(doc(host_layout=tier), {"DYN_KVBM_CPU_CACHE_GB": "4"})
    assert path == "$.host_layout" and message.startswith("must be a table of keys and values")


def test_a_missing_field_stays_an_uninitialized_field_error_through_resolve() -> None:
    with pytest.raises(UninitializedFieldError):
        resolve({"runtime": {}, "model": dict(MODEL)}, environ={})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"DYN_KVBM_METRICS_PORT": "http"},
            ("$env.DYN_KVBM_METRICS_PORT", "must be a port number 1..65535, got 'http'"),
        ),
        ({"DYN_KVBM_METRICS_PORT": "0"}, ("$env.DYN_KVBM_METRICS_PORT", "must be a port number 1..65535, got 0")),
        (
            {"DYN_KVBM_MAX_CONCURRENT_TRANSFERS": "x"},
            ("$env.DYN_KVBM_MAX_CONCURRENT_TRANSFERS", "must be a whole number, got 'x'"),
        ),
        (
            {"DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "1.5"},
            ("$env.DYN_KVBM_MAX_TRANSFER_BATCH_SIZE", "must be a whole number of blocks, got '1.5'"),
        ),
    ],
)
def test_each_setting_says_what_it_takes(environ: dict[str, str], expected: tuple[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_env(environ)
    assert caught.value.errors == [expected]
