"""Device (G1) and pinned host (G2) storage on a real GPU, and their NIXL registration.

Skipped, with the reason, where no CUDA device is visible (tests/conftest.py). Each test checks data
that went through the GPU, or what CUDA itself says of a pointer, never only that a call returned.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from syscalls import is_mapped

from kvbm_builder import (
    AllocationError,
    GpuUnavailableError,
    NixlOptions,
    PinnedAllocator,
    PinningMode,
    StorageKind,
    Tier,
)
from kvbm_builder.storage import (
    DeviceStorage,
    PinnedStorage,
    StorageClosedError,
    allocate,
    allocate_device,
    allocate_pinned,
    allocate_system,
)

pytestmark = pytest.mark.gpu

MiB = 2**20
GiB = 2**30
HOST, DEVICE = 1, 2  # cudaMemoryTypeHost, cudaMemoryTypeDevice (0: unregistered)


@pytest.fixture(scope="module")
def cupy() -> Any:
    return pytest.importorskip("cupy")


def memory_type(cupy: Any, addr: int) -> int:
    """What CUDA knows of an address: HOST (pinned), DEVICE, or 0 (not registered with CUDA)."""
    try:
        return int(cupy.cuda.runtime.pointerGetAttributes(addr).type)
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


def copy(cupy: Any, dst: int, src: int, nbytes: int, kind: int) -> None:
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, kind, stream.ptr)
    stream.synchronize()


def round_trip(cupy: Any, host: PinnedStorage, device: DeviceStorage, offset: int, nbytes: int) -> None:
    """host[offset:+n] -> device -> host[back:+n], asynchronously (pinned memory is what makes that legal)."""
    view = host.as_numpy()
    rng = np.random.default_rng(offset)
    view[offset : offset + nbytes] = rng.integers(0, 256, nbytes, dtype=np.uint8)
    back = 0 if offset >= nbytes else host.size - nbytes
    view[back : back + nbytes] = 0
    copy(cupy, device.addr, host.addr + offset, nbytes, cupy.cuda.runtime.memcpyHostToDevice)
    copy(cupy, host.addr + back, device.addr, nbytes, cupy.cuda.runtime.memcpyDeviceToHost)
    assert np.array_equal(view[back : back + nbytes], view[offset : offset + nbytes])


@pytest.fixture
def device(cupy: Any) -> Iterator[DeviceStorage]:
    with allocate_device(64 * MiB, 0) as storage:
        yield storage


# --- device (G1) ----------------------------------------------------------------------------------------


def test_device_storage_is_gpu_memory_seen_through_cupy(cupy: Any, device: DeviceStorage) -> None:
    assert device.kind is StorageKind.DEVICE and device.device_id == 0
    assert device.addr % 256 == 0
    assert memory_type(cupy, device.addr) == DEVICE
    view = device.as_cupy()
    view.fill(3)
    assert int(view.sum(dtype=cupy.uint64)) == 3 * device.size


def test_device_memory_is_exact_and_freed_on_close(cupy: Any) -> None:
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    pool_before = pool.total_bytes()
    free_before = cupy.cuda.runtime.memGetInfo()[0]
    storage = allocate_device(GiB + 4096, 0)
    assert free_before - cupy.cuda.runtime.memGetInfo()[0] >= GiB
    assert pool.total_bytes() == pool_before  # never cupy's caching pool
    storage.close()
    storage.close()
    assert cupy.cuda.runtime.memGetInfo()[0] >= free_before - 64 * MiB


def test_as_torch_is_the_same_gpu_memory(cupy: Any, device: DeviceStorage) -> None:
    torch = pytest.importorskip("torch")
    tensor = device.as_torch()
    assert tensor.is_cuda and tensor.dtype == torch.uint8 and tensor.numel() == device.size
    tensor.fill_(7)
    torch.cuda.synchronize()
    assert int(device.as_cupy()[:1000].sum()) == 7000


def test_out_of_gpu_memory_says_how_much_was_asked_and_is_free() -> None:
    with pytest.raises(AllocationError) as caught:
        allocate_device(10 * 2**40, 0)
    message = str(caught.value)
    assert message.startswith("device tier (G1): out of memory on GPU 0: asked for 10240.00 GiB")
    assert "free of" in message and "cudaMemGetInfo" in message and "num_blocks" in message


def test_a_gpu_that_does_not_exist_is_named() -> None:
    with pytest.raises(GpuUnavailableError, match=r"device_id 99 does not exist.*CUDA_VISIBLE_DEVICES"):
        allocate_device(4096, 99)
    with pytest.raises(GpuUnavailableError, match=r"host tier \(G2\): device_id 99"):
        allocate_pinned(4096, PinnedAllocator(device_id=99))


# --- pinned (G2) ----------------------------------------------------------------------------------------


def test_the_fast_path_pins_the_whole_range_and_reports_progress(cupy: Any, device: DeviceStorage) -> None:
    calls: list[tuple[int, int]] = []
    size = 256 * MiB + 12345
    storage = allocate(PinnedAllocator(threads=4, progress=lambda d, t: calls.append((d, t))), size)
    with storage:
        assert isinstance(storage, PinnedStorage)
        assert storage.kind is StorageKind.PINNED and storage.device_id == 0 and storage.gpu == 0
        assert storage.mode is PinningMode.register and storage.registrations == 1
        assert storage.populate_method in ("madvise", "memset")
        for offset in (0, size // 2, size - 1):
            assert memory_type(cupy, storage.addr + offset) == HOST
        round_trip(cupy, storage, device, 12345, 32 * MiB)
        pytest.importorskip("torch")
        assert storage.as_torch().is_pinned()
    done = [d for d, _ in calls]
    assert calls[0] == (0, size) and calls[-1] == (size, size) and done == sorted(done)
    assert memory_type(cupy, storage.addr) == 0  # unregistered on close


def test_a_copy_of_any_range_of_the_tier(cupy: Any, device: DeviceStorage) -> None:
    # one registration for the whole range: CUDA refuses a copy that spans two separately registered
    # ranges, and blocks straddle every boundary one could pick
    with allocate_pinned(256 * MiB + 12345, PinnedAllocator(threads=4)) as storage:
        for start in (64 * MiB - 3 * MiB - 7, 128 * MiB - 5, 192 * MiB - 16 * MiB):
            round_trip(cupy, storage, device, start, 32 * MiB)


def test_huge_pages_are_used_or_fall_back_and_still_pin(cupy: Any, device: DeviceStorage) -> None:
    with allocate_pinned(64 * MiB, PinnedAllocator(huge_pages=True)) as storage:
        assert storage.pages in ("hugetlb", "thp", "4k")
        assert memory_type(cupy, storage.addr) == HOST
        round_trip(cupy, storage, device, 4096, 16 * MiB)


def test_numa_placement_is_asked_for_and_still_pins(cupy: Any, device: DeviceStorage) -> None:
    with allocate_pinned(64 * MiB, PinnedAllocator(numa=True)) as storage:
        assert storage.numa_node is None or storage.numa_node >= 0
        round_trip(cupy, storage, device, 0, 16 * MiB)


def test_host_alloc_mode_is_cuda_host_alloc(cupy: Any, device: DeviceStorage) -> None:
    with allocate_pinned(64 * MiB + 1, PinnedAllocator(mode=PinningMode.host_alloc)) as storage:
        assert storage.mode is PinningMode.host_alloc and storage.registrations == 0 and storage.pages == "cuda"
        assert memory_type(cupy, storage.addr) == HOST
        round_trip(cupy, storage, device, 100, 16 * MiB)
    assert memory_type(cupy, storage.addr) == 0


def test_a_failed_registration_says_what_limits_pinning_and_leaves_nothing_mapped(
    cupy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = cupy.cuda.runtime
    tried: list[int] = []

    def refuse(ptr: int, size: int, flags: int) -> None:
        tried.append(ptr)
        raise runtime.CUDARuntimeError(2)  # cudaErrorMemoryAllocation, as when pinning hits a limit

    monkeypatch.setattr(runtime, "hostRegister", refuse)
    with pytest.raises(AllocationError) as caught:
        allocate_pinned(64 * MiB, PinnedAllocator(threads=2))
    message = str(caught.value)
    assert message.startswith("host tier (G2): cudaHostRegister of 64.0 MiB failed")
    assert "RLIMIT_MEMLOCK is " in message and "ulimit -l unlimited" in message
    assert not is_mapped(tried[0])


def test_an_abort_after_pinning_unregisters_and_unmaps(cupy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = cupy.cuda.runtime
    real = runtime.hostRegister
    pinned: list[int] = []

    def spy(ptr: int, size: int, flags: int) -> None:
        real(ptr, size, flags)
        pinned.append(ptr)

    class Abort(Exception):
        pass

    def abort_at_the_end(done: int, total: int) -> None:
        if done == total:
            raise Abort  # the progress callback may cancel a bring-up, even after the pinning

    monkeypatch.setattr(runtime, "hostRegister", spy)
    with pytest.raises(Abort):
        allocate_pinned(64 * MiB, PinnedAllocator(progress=abort_at_the_end))
    assert len(pinned) == 1
    assert memory_type(cupy, pinned[0]) == 0 and not is_mapped(pinned[0])


# --- releasing, exactly once ---------------------------------------------------------------------------


def test_an_interrupt_after_cuda_host_unregister_never_unregisters_twice(
    cupy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during cudaHostUnregister is raised once the call returns: close() fails, and the retry must not hand
    the address to CUDA again (it may belong to a new registration by then)."""
    runtime = cupy.cuda.runtime
    real = runtime.hostUnregister
    calls: list[int] = []

    def interrupted_on_return(ptr: int) -> None:
        calls.append(ptr)
        real(ptr)
        raise KeyboardInterrupt

    storage = allocate_pinned(MiB, PinnedAllocator())
    monkeypatch.setattr(runtime, "hostUnregister", interrupted_on_return)
    with pytest.raises(KeyboardInterrupt):
        storage.close()
    assert not storage.closed
    storage.close()
    assert storage.closed and calls == [storage.addr]
    assert memory_type(cupy, storage.addr) == 0  # no longer pinned
    assert not is_mapped(storage.addr)  # and the retry unmapped our mapping


@pytest.mark.parametrize("mode", ["device", "host_alloc", "register"])
def test_cuda_memory_goes_at_close_or_with_the_last_view_that_outlived_it(cupy: Any, mode: str) -> None:
    def make() -> DeviceStorage | PinnedStorage:
        if mode == "device":
            return allocate_device(4 * MiB, 0)
        return allocate_pinned(4 * MiB, PinnedAllocator(mode=PinningMode(mode)))

    def view_of(storage: DeviceStorage | PinnedStorage) -> Any:
        return storage.as_cupy() if isinstance(storage, DeviceStorage) else storage.as_numpy()

    alone = make()
    addr = alone.addr
    alone.close()
    assert memory_type(cupy, addr) == 0  # no view: gone at once

    kept = make()
    addr = kept.addr
    view = view_of(kept)[MiB:]
    kept.close()
    assert kept.closed
    with pytest.raises(StorageClosedError):
        view_of(kept)
    view[:16] = 5  # the memory outlived close(): writing is safe
    assert int(view[:16].sum()) == 80
    if mode != "register":  # device memory and cudaHostAlloc memory are freed by their last holder
        assert memory_type(cupy, addr) != 0
    del view
    gc.collect()
    assert memory_type(cupy, addr) == 0
    if mode == "register":
        assert not is_mapped(addr)


# --- NIXL -----------------------------------------------------------------------------------------------


def test_nixl_registers_vram_and_dram_and_moves_blocks_between_them(cupy: Any, device: DeviceStorage) -> None:
    pytest.importorskip("nixl._api")
    from kvbm_builder.nixl import NixlRegistry

    with allocate_pinned(64 * MiB, PinnedAllocator()) as host, NixlRegistry(NixlOptions.ENABLED, 5) as registry:
        vram = registry.register(device, Tier.G1)
        dram = registry.register(host, Tier.G2)
        assert vram is not None and dram is not None
        assert (vram.mem_type, vram.dev_id) == ("VRAM", 0) and "UCX" in vram.backends
        assert (dram.mem_type, dram.dev_id) == ("DRAM", 0)

        device.as_cupy()[: 4 * MiB] = cupy.arange(4 * MiB, dtype=cupy.uint32).view(cupy.uint8)[: 4 * MiB]
        cupy.cuda.runtime.deviceSynchronize()
        agent = registry.agent
        local = agent.get_xfer_descs([(device.addr, 4 * MiB, 0)], "VRAM")
        remote = agent.get_xfer_descs([(host.addr + MiB, 4 * MiB, 0)], "DRAM")
        handle = agent.initialize_xfer("WRITE", local, remote, agent.name)
        state = agent.transfer(handle)
        while state == "PROC":
            state = agent.check_xfer_state(handle)
        handle.release()
        assert state == "DONE"
        expected = cupy.asnumpy(device.as_cupy()[: 4 * MiB])
        assert np.array_equal(host.as_numpy()[MiB : 5 * MiB], expected)


def test_system_storage_is_pageable_even_with_a_gpu(cupy: Any) -> None:
    with allocate_system(4 * MiB) as storage:
        storage.as_numpy()[:] = 1  # touch it, so that it exists
        assert memory_type(cupy, storage.addr) == 0
