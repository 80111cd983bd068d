"""The owned builder pattern every config shares (derive_builder's, in Python)."""

from __future__ import annotations

from typing import Any

import pytest

from kvbm_builder import (
    BuilderConsumedError,
    ConfigError,
    KvBlockManagerConfig,
    KvbmError,
    KvEventConsolidatorConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    UninitializedFieldError,
)
from kvbm_builder.config import BlockParallelismStrategy, DeviceAllocator

SHARDED = BlockParallelismStrategy.LeaderWorkerSharded


def test_every_config_has_a_builder_named_after_it() -> None:
    for config in (
        KvManagerRuntimeConfig,
        KvManagerModelConfig,
        KvManagerLayoutConfig,
        KvBlockManagerConfig,
        KvEventConsolidatorConfig,
    ):
        assert type(config.builder()).__name__ == f"{config.__name__}Builder"


def test_every_setter_returns_the_builder_itself_so_calls_chain() -> None:
    builder = KvManagerModelConfig.builder()

    assert builder.num_layers(28) is builder
    assert builder.outer_dim(2).page_size(16).inner_dim(1024).dtype_width_bytes(2) is builder


def test_a_setter_called_twice_keeps_the_last_value() -> None:
    model = KvManagerModelConfig.builder().num_layers(0).num_layers(28).outer_dim(2).page_size(16).inner_dim(8)

    assert model.build().num_layers == 28


class TestBuildConsumesTheBuilder:
    def test_a_setter_after_build(self) -> None:
        builder = KvManagerRuntimeConfig.builder().worker_id(1)
        builder.build()

        with pytest.raises(BuilderConsumedError) as caught:
            builder.worker_id(2)

        assert str(caught.value) == (
            "KvManagerRuntimeConfigBuilder was consumed by build(); setting `worker_id` on it does nothing useful. "
            "Call .clone() before build() to keep a builder as a template."
        )

    @pytest.mark.parametrize(
        ("call", "doing"),
        [
            ("build", r"calling build\(\)"),
            ("clone", r"calling clone\(\)"),
            ("enable_nixl", "setting `nixl`"),
            ("disable_nixl", "setting `nixl`"),
        ],
    )
    def test_any_call_after_build(self, call: str, doing: str) -> None:
        builder = KvManagerRuntimeConfig.builder().worker_id(1)
        builder.build()

        with pytest.raises(BuilderConsumedError, match=f"consumed by build\\(\\); {doing} on it"):
            getattr(builder, call)()

    def test_is_set_after_build(self) -> None:
        builder = KvManagerRuntimeConfig.builder().worker_id(1)
        assert builder.is_set("worker_id")
        builder.build()

        with pytest.raises(BuilderConsumedError, match=r"consumed by build\(\); asking is_set\('worker_id'\) on it"):
            builder.is_set("worker_id")

    def test_custom_setters_after_build(self) -> None:
        layout = KvManagerLayoutConfig.builder().num_blocks(1).logical(SHARDED)
        layout.build()
        manager = KvBlockManagerConfig.builder()
        with pytest.raises(ConfigError):
            manager.build()

        with pytest.raises(BuilderConsumedError, match="setting `allocator`"):
            layout.allocator(DeviceAllocator())
        with pytest.raises(BuilderConsumedError, match="setting `layout_type`"):
            layout.layout_type("fully_contiguous")
        with pytest.raises(BuilderConsumedError, match="setting `layout_type`"):
            layout.layout_type("zigzag")  # a setter that would have rejected its input
        with pytest.raises(BuilderConsumedError, match="setting `consolidator_config`"):
            manager.consolidator_config("tcp://localhost:5557", "tcp://*:5558", "vllm")

    def test_a_failed_build_consumes_too(self) -> None:
        # owned: build() takes the builder, whatever it returns
        builder = KvManagerModelConfig.builder()
        with pytest.raises(UninitializedFieldError):
            builder.build()

        with pytest.raises(BuilderConsumedError):
            builder.num_layers(1)

    def test_a_consumed_builder_says_so(self) -> None:
        builder = KvManagerModelConfig.builder().num_layers(2)
        assert repr(builder) == "KvManagerModelConfigBuilder(num_layers=2)"

        with pytest.raises(UninitializedFieldError):
            builder.build()
        assert repr(builder) == "KvManagerModelConfigBuilder(consumed)"

    def test_consumed_is_a_kvbm_error_and_a_runtime_error(self) -> None:
        assert issubclass(BuilderConsumedError, KvbmError)
        assert issubclass(BuilderConsumedError, RuntimeError)


class TestClone:
    def test_a_template_for_several_configs(self) -> None:
        template = KvManagerLayoutConfig.builder().layout_type("layer_separate_outer_contiguous").alignment(256)

        device = template.clone().num_blocks(1024).allocator(DeviceAllocator()).build()
        logical = template.clone().num_blocks(64).logical(SHARDED).build()

        assert device.num_blocks == 1024 and logical.num_blocks == 64
        assert device.layout_type == logical.layout_type
        assert device.alignment == logical.alignment == 256
        assert template.is_set("layout_type") and not template.is_set("num_blocks")  # the template is untouched

    def test_a_clone_is_independent_both_ways(self) -> None:
        original = KvManagerModelConfig.builder().num_layers(2)
        twin = original.clone()
        twin.num_layers(3)
        original.outer_dim(1)

        assert repr(original) == "KvManagerModelConfigBuilder(num_layers=2, outer_dim=1)"
        assert repr(twin) == "KvManagerModelConfigBuilder(num_layers=3)"

    def test_a_clone_survives_the_build_of_its_original(self) -> None:
        original = KvManagerRuntimeConfig.builder().worker_id(5)
        twin = original.clone()
        original.build()

        assert twin.build().worker_id == 5

    def test_a_clone_keeps_rejected_calls(self) -> None:
        original = KvManagerRuntimeConfig.builder().worker_id(5).use_nixl_agent(None)

        with pytest.raises(ConfigError, match="use_nixl_agent"):
            original.clone().build()
        assert original.is_set("nixl")


class TestIsSet:
    """The storage / allocator / logical choice follows whether the setter was called, not the value."""

    def test_is_set_follows_the_call(self) -> None:
        builder = KvManagerLayoutConfig.builder()
        assert not builder.is_set("storage")

        builder.storage(None)
        assert builder.is_set("storage")

    def test_a_rejected_call_counts_as_set(self) -> None:
        builder = KvManagerLayoutConfig.builder().layout_type("zigzag")

        assert builder.is_set("layout_type")


class TestUninitializedField:
    @pytest.mark.parametrize(
        ("builder", "first", "missing"),
        [
            (KvManagerRuntimeConfig.builder(), "worker_id", ("worker_id",)),
            (KvManagerModelConfig.builder(), "num_layers", ("num_layers", "outer_dim", "page_size", "inner_dim")),
            (KvManagerLayoutConfig.builder().logical(SHARDED), "num_blocks", ("num_blocks",)),
            (KvBlockManagerConfig.builder(), "runtime", ("runtime", "model")),
        ],
    )
    def test_the_message_is_upstreams_for_the_first_missing_field(
        self, builder: Any, first: str, missing: tuple[str, ...]
    ) -> None:
        with pytest.raises(UninitializedFieldError) as caught:
            builder.build()

        assert str(caught.value).splitlines()[0] == f"`{first}` must be initialized"
        assert caught.value.missing == missing
        if len(missing) == 1:
            assert str(caught.value) == f"`{first}` must be initialized"

    def test_declaration_order_not_call_order(self) -> None:
        with pytest.raises(UninitializedFieldError) as caught:
            KvManagerModelConfig.builder().inner_dim(8).num_layers(2).build()

        assert str(caught.value).splitlines()[0] == "`outer_dim` must be initialized"

    def test_errors_list_every_missing_field_and_every_other_problem(self) -> None:
        with pytest.raises(UninitializedFieldError) as caught:
            KvManagerModelConfig.builder().outer_dim(3).build()

        assert caught.value.errors == [
            ("model.num_layers", "must be initialized"),
            ("model.page_size", "must be initialized"),
            ("model.inner_dim", "must be initialized"),
            ("model.outer_dim", "must be 1 or 2, got 3"),
        ]

    def test_a_config_with_no_required_field_builds_from_nothing(self) -> None:
        assert KvEventConsolidatorConfig.builder().build() == KvEventConsolidatorConfig()

    def test_it_is_a_config_error(self) -> None:
        assert issubclass(UninitializedFieldError, ConfigError)


class TestTheValidateHookComesFirst:
    """Upstream's build_fn(validate) runs before the missing-field check, so its error is the one seen."""

    def test_hook_error_and_missing_field(self) -> None:
        with pytest.raises(ConfigError) as caught:
            KvManagerLayoutConfig.builder().allocator(DeviceAllocator()).logical(SHARDED).build()

        assert not isinstance(caught.value, UninitializedFieldError)
        assert caught.value.errors == [
            (
                "layout.logical",
                "only one of `storage`, `allocator` or `logical` may be chosen, but `allocator`, `logical` were set",
            ),
            ("layout.num_blocks", "must be initialized"),
        ]

    def test_a_rejected_custom_setter_is_listed_first_but_is_no_hook_failure(self) -> None:
        # where upstream panics in the setter, its problem is listed before any missing field; but only the
        # validate hook decides the class, so a missing field still gives upstream's UninitializedFieldError
        with pytest.raises(UninitializedFieldError) as caught:
            KvBlockManagerConfig.builder().consolidator_config("tcp://localhost:5557", None, "vllm").build()

        assert str(caught.value).splitlines()[:2] == [
            "3 problems in the configuration:",  # every problem, the first one first
            "  consolidator_config: output_endpoint is required for vLLM; e.g. 'tcp://*:5558'",
        ]
        assert caught.value.missing == ("runtime", "model")
        assert [path for path, _ in caught.value.errors] == ["consolidator_config", "runtime", "model"]

    def test_a_refused_agent_with_no_worker_id_is_an_uninitialized_field(self) -> None:
        # the runtime builder has no validate hook: use_nixl_agent(None) is one more problem, not a hook failure
        with pytest.raises(UninitializedFieldError) as caught:
            KvManagerRuntimeConfig.builder().use_nixl_agent(None).build()

        assert caught.value.missing == ("worker_id",)
        assert caught.value.errors == [
            (
                "runtime.nixl",
                "use_nixl_agent() needs an agent, got None; use enable_nixl() to let the manager create one",
            ),
            ("runtime.worker_id", "must be initialized"),
        ]


@pytest.mark.parametrize(
    "config",
    [
        KvManagerRuntimeConfig,
        KvManagerModelConfig,
        KvManagerLayoutConfig,
        KvBlockManagerConfig,
        KvEventConsolidatorConfig,
    ],
)
def test_every_field_has_its_typed_setter_and_every_setter_its_field(config: Any) -> None:
    # a field is described once, on the config; its setter is the one line a type checker needs to see it
    import attrs

    builder = type(config.builder())
    fields = {field.name for field in attrs.fields(config)}
    setters = {name for name in vars(builder) if not name.startswith("_")}
    extras = {"enable_nixl", "use_nixl_agent", "disable_nixl"}  # upstream's custom setters of `nixl`
    assert fields <= setters, f"{builder.__name__} lacks a setter for {sorted(fields - setters)}"
    assert setters - fields <= extras
