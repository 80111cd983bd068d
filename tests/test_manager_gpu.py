"""KvBlockManager on a real GPU: device + pinned + disk tiers, registered with NIXL, data through the views."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kvbm_builder import (
    DeviceAllocator,
    DiskAllocator,
    DiskStorageError,
    KvBlockManager,
    KvBlockManagerConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    PinnedAllocator,
    StorageKind,
    Tier,
)

pytestmark = pytest.mark.gpu

MODEL = KvManagerModelConfig.builder().num_layers(4).outer_dim(2).page_size(16).inner_dim(256).build()


def layout(blocks: int, allocator: Any, layout_type: Any = None, alignment: int = 1) -> KvManagerLayoutConfig[Any]:
    builder = KvManagerLayoutConfig.builder().num_blocks(blocks).allocator(allocator).alignment(alignment)
    return (builder.layout_type(layout_type) if layout_type is not None else builder).build()


def config(tmp_path: Path, nixl: bool, disk_dir: Path | None = None) -> KvBlockManagerConfig:
    runtime = KvManagerRuntimeConfig.builder().worker_id(3)
    return (
        KvBlockManagerConfig.builder()
        .runtime((runtime.enable_nixl() if nixl else runtime.disable_nixl()).build())
        .model(MODEL)
        .device_layout(layout(8, DeviceAllocator(device_id=0), LayerSeparate(outer_contiguous=True), alignment=256))
        .host_layout(layout(16, PinnedAllocator(device_id=0)))
        .disk_layout(layout(32, DiskAllocator(directory=str(disk_dir or tmp_path))))
        .build()
    )


def free_device_bytes() -> int:
    import cupy

    free, _total = cupy.cuda.runtime.memGetInfo()
    return int(free)


def test_three_tiers_come_up_registered_and_move_a_block_device_host_disk_and_back(tmp_path: Path) -> None:
    pytest.importorskip("nixl")
    import cupy
    import numpy as np

    with KvBlockManager(config(tmp_path, nixl=True)) as manager:
        assert [t for t in manager.tiers] == [Tier.G1, Tier.G2, Tier.G3]
        device, host, disk = manager.tier("G1"), manager.tier("G2"), manager.tier("G3")
        assert device.kind is StorageKind.DEVICE and host.kind is StorageKind.PINNED
        registry = manager._nixl
        assert registry is not None
        assert [r.mem_type for r in registry.registrations] == ["VRAM"] * 4 + ["DRAM", "FILE"]

        layers = device.views(dtype=cupy.float16)  # per layer: [outer, blocks, page, inner]
        for layer, view in enumerate(layers):
            for outer in range(MODEL.outer_dim):
                region = device.memory_region(5, layer, outer)
                assert view[outer, 5].data.ptr == region.addr
                view[outer, 5] = cupy.random.standard_normal(view[outer, 5].shape).astype(cupy.float16)
        host_view = host.views(dtype=np.float16)[0]  # [blocks, layers, outer, page, inner]
        for layer, view in enumerate(layers):
            for outer in range(MODEL.outer_dim):
                view[outer, 5].get(out=host_view[2, layer, outer])
        (file,) = disk.storages
        file.write(disk.memory_region(9, 0, 0).addr, host_view[2])
        back = np.zeros_like(host_view[2])
        file.read_into(disk.memory_region(9, 0, 0).addr, back)
        assert (back == host_view[2]).all()
        for layer, view in enumerate(layers):
            for outer in range(MODEL.outer_dim):
                assert (cupy.asnumpy(view[outer, 5]) == back[layer, outer]).all()


def test_device_views_are_torch_tensors_an_engine_can_use(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    with KvBlockManager(config(tmp_path, nixl=False)) as manager:
        tensors = manager.tier("G1").torch_views(dtype=torch.bfloat16)
        assert len(tensors) == MODEL.num_layers
        assert tensors[0].is_cuda and tensors[0].dtype == torch.bfloat16
        assert tuple(tensors[0].shape) == (2, 8, 16, 256)
        tensors[1][0, 3] = 1.5
        region = manager.memory_region("G1", 3, 1, 0)
        assert tensors[1][0, 3].data_ptr() == region.addr
        assert float(tensors[1][0, 3].float().sum()) == 1.5 * 16 * 256


def test_a_late_failure_frees_the_device_and_pinned_tiers(tmp_path: Path) -> None:
    before = free_device_bytes()
    with pytest.raises(DiskStorageError, match="DYN_KVBM_DISK_CACHE_DIR"):
        KvBlockManager(config(tmp_path, nixl=False, disk_dir=tmp_path / "missing"))
    assert free_device_bytes() >= before - (2 << 20)  # what the driver keeps for itself aside
    assert os.listdir(tmp_path) == []


def test_torch_views_take_numeric_dtypes_of_the_models_width_only(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from kvbm_builder import LayoutError

    with KvBlockManager(config(tmp_path, nixl=False)) as manager:  # dtype_width_bytes 2
        device = manager.tier("G1")
        for good in (torch.bfloat16, torch.float16, torch.int16):
            assert device.torch_views(dtype=good)[0].dtype == good
        for bad in (torch.bool, torch.float32, torch.uint8, "float16", object, None.__class__):
            with pytest.raises(LayoutError, match=r"device tier \(G1\): torch views need a floating, complex or int"):
                device.torch_views(dtype=bad)


def test_device_and_pinned_views_outlive_a_manager_collected_unclosed(tmp_path: Path) -> None:
    import gc

    import cupy
    import numpy as np

    manager = KvBlockManager(config(tmp_path, nixl=False))
    device_views = manager.tier("G1").views(dtype=cupy.float16)
    host_view = manager.tier("G2").views(dtype=np.float16)[0]
    del manager
    gc.collect()
    assert os.listdir(tmp_path) == []  # the disk tier went with the manager: it has no views
    for view in device_views:
        view[...] = 2
    host_view[...] = 3
    cupy.cuda.runtime.deviceSynchronize()
    assert all(float(v.astype(cupy.float32).mean()) == 2 for v in device_views)
    assert float(host_view.astype(np.float32).mean()) == 3
