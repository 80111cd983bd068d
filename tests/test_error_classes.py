"""Every error is a KvbmError subclass that says what kind of thing went wrong: none raises a bare KvbmError, and a
caller's object whose ``__repr__`` raises never turns an error message into that object's own exception."""

from __future__ import annotations

import ast
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import pytest

import kvbm_builder
from kvbm_builder import (
    AllocationError,
    KvBlockManager,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    SystemAllocator,
)
from kvbm_builder.blocks import FrequencyFilter
from kvbm_builder.config import StorageKind
from kvbm_builder.errors import MetricsError, OffloadError

PACKAGE = Path(kvbm_builder.__file__).parent


def test_no_module_raises_a_bare_kvbm_error() -> None:
    bare = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            call = node.exc if isinstance(node, ast.Raise) else None
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "KvbmError":
                bare.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert bare == []


def test_a_frequency_filter_started_twice_is_an_offload_error() -> None:
    with FrequencyFilter(flush_interval=3600).start() as ticking, pytest.raises(OffloadError, match="already ticking"):
        ticking.start()


class Refusing:
    """A caller's allocator that cannot allocate, and whose ``__repr__`` raises too."""

    storage_kind = StorageKind.SYSTEM

    def allocate(self, size: int) -> Any:
        raise OSError(28, "No space left on device")

    def __repr__(self) -> str:
        raise RuntimeError("a repr that fails")


def manager_config(allocator: object, **runtime: Any) -> Any:
    model = KvManagerModelConfig.builder().num_layers(1).outer_dim(1).page_size(4).inner_dim(8).build()
    host = KvManagerLayoutConfig.builder().num_blocks(2).allocator(allocator).build()  # type: ignore[arg-type]
    builder = KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl()
    return kvbm_builder.KvBlockManagerConfig.builder().runtime(builder.build()).model(model).host_layout(host).build()


def half_built(traceback: TracebackType | None) -> KvBlockManager:
    """The manager whose bring-up raised, as Python still lets a caller reach it: from the traceback."""
    while traceback is not None:
        found = traceback.tb_frame.f_locals.get("self")
        if isinstance(found, KvBlockManager):
            return found
        traceback = traceback.tb_next
    raise AssertionError("no manager in the traceback")


def test_an_allocation_error_names_an_allocator_whose_repr_raises() -> None:
    shown = r"allocator <Refusing instance at 0x[0-9a-f]+> failed to allocate \d+ bytes: OSError"
    with pytest.raises(AllocationError, match=shown):
        KvBlockManager(manager_config(Refusing()))


def test_a_manager_that_never_came_up_says_so_with_the_right_error() -> None:
    from kvbm_builder.metrics import KvbmMetrics

    closed = KvbmMetrics()
    closed.close()
    config = attrs.evolve(manager_config(SystemAllocator()), kvbm_metrics=closed)
    with pytest.raises(MetricsError, match="these KvbmMetrics were closed") as caught:
        KvBlockManager(config)  # fails first thing, before it has metrics or blocks
    manager = half_built(caught.value.__traceback__)
    with pytest.raises(MetricsError, match="did not come up; it has no metrics"):
        _ = manager.metrics
    with pytest.raises(OffloadError, match="did not come up; it has no blocks to move"):
        _ = manager.offload_manager
