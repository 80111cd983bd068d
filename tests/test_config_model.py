"""KvManagerModelConfig: the shape of one KV block, every field, default, rule and derived value."""

from __future__ import annotations

import attrs
import pytest

from kvbm_builder import ConfigError, KvManagerModelConfig, UninitializedFieldError


def llama_8b() -> KvManagerModelConfig:
    """The reference's worked example: 28 layers, K and V, 16 tokens per block, 8 heads x 128, bf16."""
    return KvManagerModelConfig.builder().num_layers(28).outer_dim(2).page_size(16).inner_dim(1024).build()


def test_a_model_is_built_from_its_four_required_fields_and_dtype_width_defaults_to_two_bytes() -> None:
    model = llama_8b()

    assert (model.num_layers, model.outer_dim, model.page_size, model.inner_dim) == (28, 2, 16, 1024)
    assert model.dtype_width_bytes == 2


def test_every_field_can_be_set() -> None:
    model = (
        KvManagerModelConfig.builder().num_layers(61).outer_dim(1).page_size(64).inner_dim(576).dtype_width_bytes(1)
    ).build()

    assert model == KvManagerModelConfig(num_layers=61, outer_dim=1, page_size=64, inner_dim=576, dtype_width_bytes=1)


def test_derived_sizes_of_the_worked_example() -> None:
    model = llama_8b()

    assert model.region_bytes == 16 * 1024 * 2 == 32_768  # one (block, layer, outer) region
    assert model.bytes_per_block == 1_835_008
    assert model.bytes_per_token == 28 * 2 * 1024 * 2
    assert model.bytes_per_block == model.bytes_per_token * model.page_size


def test_blocks_for_bytes_truncates_to_whole_blocks() -> None:
    model = llama_8b()

    assert model.blocks_for_bytes(4 * 10**9) == 2179  # 4 GB, the reference's example
    assert model.blocks_for_bytes(model.bytes_per_block) == 1
    assert model.blocks_for_bytes(model.bytes_per_block - 1) == 0
    assert model.blocks_for_bytes(0) == 0


@pytest.mark.parametrize("budget", [-1, 1.5, "4GB", True, None])
def test_blocks_for_bytes_wants_a_byte_count(budget: object) -> None:
    with pytest.raises(ConfigError) as caught:
        llama_8b().blocks_for_bytes(budget)  # type: ignore[arg-type]

    ((path, message),) = caught.value.errors
    assert path == "budget"
    assert message.startswith("must be a byte count >= 0, got")


def test_a_missing_field_is_named_like_upstream() -> None:
    with pytest.raises(UninitializedFieldError) as caught:
        KvManagerModelConfig.builder().num_layers(28).outer_dim(2).build()

    assert str(caught.value).splitlines() == [
        "`page_size` must be initialized",  # upstream's message, then every problem
        "2 problems in the configuration:",
        "  model.page_size: must be initialized",
        "  model.inner_dim: must be initialized",
    ]
    assert caught.value.missing == ("page_size", "inner_dim")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_layers", 0, "must be >= 1, got 0"),
        ("num_layers", -3, "must be >= 1, got -3"),
        ("outer_dim", 0, "must be 1 or 2, got 0"),
        ("outer_dim", 3, "must be 1 or 2, got 3"),
        ("page_size", 0, "must be >= 1, got 0"),
        ("inner_dim", 0, "must be >= 1, got 0"),
        ("dtype_width_bytes", 0, "must be 1, 2, 4 or 8, got 0"),
        ("dtype_width_bytes", 3, "must be 1, 2, 4 or 8, got 3"),
        ("dtype_width_bytes", 16, "must be 1, 2, 4 or 8, got 16"),
    ],
)
def test_ranges_are_checked_at_build(field: str, value: int, message: str) -> None:
    builder = KvManagerModelConfig.builder().num_layers(28).outer_dim(2).page_size(16).inner_dim(1024)
    getattr(builder, field)(value)

    with pytest.raises(ConfigError) as caught:
        builder.build()

    assert caught.value.errors == [(f"model.{field}", message)]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (True, "True (bool)"),  # True is not a count
        ("4", "'4' (str)"),  # nor is text
        (4.0, "4.0"),  # nor a float, even a whole one
        (None, "None"),
    ],
)
def test_types_are_strict(value: object, shown: str) -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerModelConfig.builder().num_layers(value).outer_dim(2).page_size(16).inner_dim(1024).build()  # type: ignore[arg-type]

    assert caught.value.errors == [("model.num_layers", f"must be an integer, got {shown}")]


def test_every_problem_of_one_build_is_reported_together() -> None:
    with pytest.raises(ConfigError) as caught:
        (
            KvManagerModelConfig.builder().num_layers(0).outer_dim(3).page_size(16).inner_dim(True).dtype_width_bytes(3)
        ).build()

    assert caught.value.errors == [
        ("model.num_layers", "must be >= 1, got 0"),
        ("model.outer_dim", "must be 1 or 2, got 3"),
        ("model.inner_dim", "must be an integer, got True (bool)"),
        ("model.dtype_width_bytes", "must be 1, 2, 4 or 8, got 3"),
    ]


def test_a_huge_integer_is_reported_not_crashed_on() -> None:
    # past 4300 digits Python refuses to print an int; the message must still be made
    with pytest.raises(ConfigError) as caught:
        KvManagerModelConfig.builder().num_layers(1).outer_dim(10**5000).page_size(1).inner_dim(1).build()

    assert caught.value.errors == [("model.outer_dim", "must be 1 or 2, got an integer of 16610 bits (int)")]


def test_direct_construction_checks_the_same_rules() -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerModelConfig(num_layers=28, outer_dim=2, page_size=16, inner_dim=1024, dtype_width_bytes=3)

    assert caught.value.errors == [("model.dtype_width_bytes", "must be 1, 2, 4 or 8, got 3")]


def test_evolve_checks_too() -> None:
    with pytest.raises(ConfigError, match="outer_dim: must be 1 or 2, got 4"):
        attrs.evolve(llama_8b(), outer_dim=4)

    assert attrs.evolve(llama_8b(), outer_dim=1).bytes_per_block == 1_835_008 // 2


def test_a_model_is_frozen_hashable_and_compared_by_value() -> None:
    model = llama_8b()

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        model.num_layers = 1  # type: ignore[misc]
    assert model == llama_8b()
    assert len({model, llama_8b()}) == 1


def test_fields_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        KvManagerModelConfig(28, 2, 16, 1024)  # type: ignore[call-arg]
