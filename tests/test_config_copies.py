"""Copying and pickling configs and builders: a frozen config is a value; its runtime objects stay themselves."""

from __future__ import annotations

import copy
import pickle

import pytest
from callers import SeenTwice

from kvbm_builder import (
    KvBlockManagerConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    RuntimeObjectError,
)
from kvbm_builder.config import DeviceAllocator, DiskAllocator, PinnedAllocator

MODEL = KvManagerModelConfig.builder().num_layers(2).outer_dim(2).page_size(16).inner_dim(64).build()


def config() -> KvBlockManagerConfig:
    host = KvManagerLayoutConfig.builder().num_blocks(8).allocator(PinnedAllocator()).offload_filter(SeenTwice())
    return (
        KvBlockManagerConfig.builder()
        .runtime(KvManagerRuntimeConfig.builder().worker_id(3).build())
        .model(MODEL)
        .host_layout(host.build())
        .disk_layout(KvManagerLayoutConfig.builder().num_blocks(8).allocator(DiskAllocator()).build())
        .build()
    )


def test_deepcopy_of_a_config_with_a_runtime_config_shares_its_runtime_objects() -> None:
    # it used to fail: "cannot pickle '_thread.lock' object" (the token, the registry)
    original = config()
    copied = copy.deepcopy(original)
    assert copied == original
    assert copied.runtime.cancellation_token is original.runtime.cancellation_token
    assert copied.runtime.metrics_registry is original.runtime.metrics_registry
    assert copy.copy(original) == original


def test_pickling_a_runtime_object_names_the_field() -> None:
    with pytest.raises(RuntimeObjectError) as caught:
        pickle.dumps(config())
    [(path, message)] = caught.value.errors
    assert path == "runtime.cancellation_token"
    assert "cannot be pickled" in message and "dump(config)" in message
    assert isinstance(caught.value, TypeError)  # what pickle's callers catch


def test_configs_of_plain_data_pickle() -> None:
    for value in (
        MODEL,
        DeviceAllocator(device_id=1),
        KvManagerLayoutConfig.builder().num_blocks(2).allocator(DiskAllocator()).build(),
    ):
        assert pickle.loads(pickle.dumps(value)) == value


def test_copy_of_a_builder_is_a_clone() -> None:
    # it used to share its values with the original
    original = KvManagerModelConfig.builder().num_layers(2)
    twin = copy.copy(original)
    twin.num_layers(5).outer_dim(1)
    assert repr(original) == "KvManagerModelConfigBuilder(num_layers=2)"
    assert repr(copy.deepcopy(original)) == "KvManagerModelConfigBuilder(num_layers=2)"
    assert twin.page_size(1).inner_dim(1).build().num_layers == 5


@pytest.mark.parametrize("field", ["num_layers", "page_size", "inner_dim"])
def test_model_counts_are_usize_as_upstream(field: str) -> None:
    values = {"num_layers": 1, "outer_dim": 1, "page_size": 1, "inner_dim": 1, field: 2**64 - 1}
    assert getattr(KvManagerModelConfig(**values), field) == 2**64 - 1
    with pytest.raises(ValueError, match=f"model.{field}: must be <= 18446744073709551615, got 18446744073709551616"):
        KvManagerModelConfig(**{**values, field: 2**64})
