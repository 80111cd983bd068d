"""Memory lives as long as anything can still touch it: a view (numpy, torch, a view of a view, DLPack) keeps the
memory it shows alive, whatever happens to its storage or manager: closed, garbage-collected or both.

``close()`` with live views gives up the storage's hold and refuses new use; the memory itself is released when the
last view is gone. Each crash-prone case runs in a child interpreter, so that a segfault fails the test instead of
ending the test run.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvbm_builder import (
    DiskAllocator,
    KvBlockManager,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    SystemAllocator,
)
from kvbm_builder.storage import allocate_system

MODEL = KvManagerModelConfig.builder().num_layers(3).outer_dim(2).page_size(4).inner_dim(8).build()

SETUP = """
import gc, sys
import numpy as np
from kvbm_builder import *
from kvbm_builder.storage import allocate_system
MODEL = KvManagerModelConfig.builder().num_layers(3).outer_dim(2).page_size(4).inner_dim(8).build()
def is_mapped(addr):
    with open("/proc/self/maps") as f:
        return any(int(lo, 16) <= addr < int(hi, 16) for lo, hi in (line.split()[0].split("-") for line in f))
def manager(nixl=False, layout=None):
    runtime = KvManagerRuntimeConfig.builder().worker_id(7)
    runtime = (runtime.enable_nixl() if nixl else runtime.disable_nixl()).build()
    host = KvManagerLayoutConfig.builder().num_blocks(64).allocator(SystemAllocator())
    if layout is not None:
        host = host.layout_type(layout)
    return KvBlockManager.builder().runtime(runtime).model(MODEL).host_layout(host.build()).build()
"""


def run_child(body: str) -> str:
    """Run ``body`` in a fresh interpreter; it must exit cleanly (a segfault is exit status -11) and print ``ok``."""
    code = SETUP + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"child exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip().endswith("ok"), done.stdout + done.stderr
    return done.stdout


def is_mapped(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


# --- a manager that is collected without close() ------------------------------------------------------------


def test_views_outlive_a_manager_collected_without_close() -> None:
    run_child(
        """
        m = manager()
        views = m.tier("G2").views()
        del m                                          # the manager is garbage now, never closed
        gc.collect()
        for i, view in enumerate(views):
            view[...] = i + 1                          # writing must not touch unmapped memory
        print(sum(int(v.sum()) for v in views), "ok")
        """
    )


def test_views_outlive_a_manager_collected_with_nixl_on() -> None:
    pytest.importorskip("nixl")
    run_child(
        """
        m = manager(nixl=True)
        view = m.tier("G2").views()[0]
        del m
        gc.collect()
        view[...] = 5
        assert int(view.sum()) == 5 * view.size
        print("ok")
        """
    )


def test_views_of_views_torch_tensors_and_dlpack_keep_the_memory() -> None:
    pytest.importorskip("torch")
    run_child(
        """
        import torch
        from torch.utils.dlpack import from_dlpack
        m = manager(layout=LayerSeparate(outer_contiguous=True))
        base = m.tier("G2").views(dtype=np.float16)[1]
        derived = [base[1, 3:], base.view(np.int16)[0], memoryview(base[0, 0, 0]).cast("B"), torch.from_numpy(base[0]),
                   from_dlpack(base[1]), np.from_dlpack(base)]
        del base, m
        gc.collect()
        for d in derived:
            if isinstance(d, memoryview):
                d[0] = 1
            else:
                d[...] = 1
        print("ok")
        """
    )


# --- an explicit close() with live views ---------------------------------------------------------------------


def test_closing_a_manager_with_live_views_keeps_the_memory_until_the_views_go() -> None:
    run_child(
        """
        m = manager()
        tier = m.tier("G2")
        (view,) = tier.views()
        view[...] = 7
        addr = view.ctypes.data
        m.close()
        assert m.closed and all(s.closed for s in tier.storages)
        try:
            tier.views()
        except KvbmError as e:
            assert "released" in str(e)               # no new use
        else:
            raise AssertionError("a closed tier gave a new view")
        assert (view == 7).all()                       # the old view still sees its bytes
        view[...] = 8
        del view
        gc.collect()
        assert not is_mapped(addr)                     # the last view took the memory with it
        print("ok")
        """
    )


def test_closing_a_storage_with_a_live_view_releases_the_memory_with_the_view() -> None:
    run_child(
        """
        from kvbm_builder.storage import StorageClosedError
        storage = allocate_system(3 * 4096)
        view = storage.as_numpy()[100:].view(np.uint16)
        view[:] = 0xBEEF
        storage.close()
        assert storage.closed
        try:
            storage.as_numpy()
        except StorageClosedError:
            pass
        else:
            raise AssertionError("a closed storage gave a new view")
        assert (view == 0xBEEF).all()
        addr = storage.addr
        assert is_mapped(addr)
        del view
        gc.collect()
        assert not is_mapped(addr)
        print("ok")
        """
    )


def test_a_closed_storage_with_views_is_released_in_a_child_too() -> None:
    run_child(
        """
        storage = allocate_system(1 << 20)
        view = storage.as_numpy()
        storage.close()
        del storage
        gc.collect()
        view[:] = 3
        print(int(view[:10].sum()), "ok")
        """
    )


def test_without_views_close_releases_the_memory_at_once(tmp_path: Path) -> None:
    runtime = KvManagerRuntimeConfig.builder().worker_id(7).disable_nixl().build()
    host = KvManagerLayoutConfig.builder().num_blocks(4).allocator(SystemAllocator()).build()
    disk = KvManagerLayoutConfig.builder().num_blocks(4).allocator(DiskAllocator(directory=str(tmp_path))).build()
    manager = KvBlockManager.builder().runtime(runtime).model(MODEL).host_layout(host).disk_layout(disk).build()
    (storage,) = manager.tier("G2").storages
    views = manager.tier("G2").views()
    del views
    manager.close()
    assert not is_mapped(storage.addr) and list(tmp_path.iterdir()) == []


# --- GPU: cupy and torch views of device memory ---------------------------------------------------------------


@pytest.mark.gpu
def test_device_views_outlive_a_manager_collected_without_close() -> None:
    run_child(
        """
        import cupy
        def device_manager():
            runtime = KvManagerRuntimeConfig.builder().worker_id(7).disable_nixl().build()
            g1 = KvManagerLayoutConfig.builder().num_blocks(64).allocator(DeviceAllocator()).build()
            return KvBlockManager.builder().runtime(runtime).model(MODEL).device_layout(g1).build()
        m = device_manager()
        views = m.tier("G1").views()
        del m                                          # collected, never closed
        gc.collect()
        for view in views:
            view[...] = 3
        cupy.cuda.runtime.deviceSynchronize()
        assert all(int(v.sum()) == 3 * v.size for v in views)
        print("ok")
        """
    )


@pytest.mark.gpu
def test_torch_views_of_the_device_tier_outlive_the_manager_and_then_free_it() -> None:
    pytest.importorskip("torch")
    run_child(
        """
        import cupy, torch
        def free():
            return cupy.cuda.runtime.memGetInfo()[0]
        runtime = KvManagerRuntimeConfig.builder().worker_id(7).disable_nixl().build()
        g1 = KvManagerLayoutConfig.builder().num_blocks(1 << 16).allocator(DeviceAllocator()).build()  # 24 MiB
        m = KvBlockManager.builder().runtime(runtime).model(MODEL).device_layout(g1).build()
        tensors = m.tier("G1").torch_views(dtype=torch.float16)
        m.close()                                # explicit close with live tensors
        del m
        gc.collect()
        for t in tensors:
            t.fill_(1.5)
        torch.cuda.synchronize()
        assert all(float(t.float().mean()) == 1.5 for t in tensors)
        still = free()
        del tensors, t  # the loop's name held the last tensor
        gc.collect()
        torch.cuda.synchronize()
        assert free() > still, "the device memory went with the last tensor"
        print("ok")
        """
    )


@pytest.mark.gpu
def test_a_cupy_view_of_a_closed_device_storage_stays_valid() -> None:
    run_child(
        """
        import cupy
        from kvbm_builder.storage import allocate_device
        storage = allocate_device(1 << 20, 0)
        view = storage.as_cupy()[4096:]
        storage.close()
        del storage
        gc.collect()
        view.fill(9)
        cupy.cuda.runtime.deviceSynchronize()
        assert int(view.sum()) == 9 * view.size
        print("ok")
        """
    )


@pytest.mark.gpu
def test_pinned_views_outlive_a_collected_manager_in_both_modes() -> None:
    run_child(
        """
        for mode in (PinningMode.register, PinningMode.host_alloc):
            runtime = KvManagerRuntimeConfig.builder().worker_id(7).disable_nixl().build()
            g2 = KvManagerLayoutConfig.builder().num_blocks(64).allocator(PinnedAllocator(mode=mode)).build()
            m = KvBlockManager.builder().runtime(runtime).model(MODEL).host_layout(g2).build()
            view = m.tier("G2").views()[0]
            del m
            gc.collect()
            view[...] = 4
            assert int(view.sum()) == 4 * view.size
        print("ok")
        """
    )


def test_views_keep_storage_objects_alive_while_they_exist() -> None:
    # the storage is still reachable through its view, so nothing warns about an unclosed storage early
    view = allocate_system(4096).as_numpy()
    gc.collect()
    view[:] = 1
    with pytest.warns(ResourceWarning, match="unclosed SystemStorage"):
        del view
        gc.collect()
