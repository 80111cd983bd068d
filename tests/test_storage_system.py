"""System host memory (G2 without CUDA): an anonymous mapping, viewable from numpy, unmapped on close."""

from __future__ import annotations

import errno
import gc
import mmap
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from syscalls import is_mapped

from kvbm_builder import AllocationError, KvbmError, StorageKind, SystemAllocator
from kvbm_builder.config.protocols import Storage
from kvbm_builder.storage import StorageClosedError, SystemStorage, _libc, allocate, allocate_system


def test_a_system_storage_is_page_aligned_zeroed_host_memory() -> None:
    with allocate_system(10_000) as storage:
        assert isinstance(storage, Storage)
        assert storage.kind is StorageKind.SYSTEM
        assert storage.size == 10_000
        assert storage.device_id == 0
        assert storage.addr % mmap.PAGESIZE == 0
        view = storage.as_numpy()
        assert view.dtype == np.uint8 and view.shape == (10_000,)
        assert not view.any()


def test_views_share_the_memory_without_copying() -> None:
    with allocate_system(4096) as storage:
        first, second = storage.as_numpy(), storage.as_numpy()
        first[100:200] = 7
        assert second[100:200].tolist() == [7] * 100
        assert first.ctypes.data == storage.addr


def test_close_unmaps_the_memory_and_is_idempotent() -> None:
    storage = allocate_system(3 * mmap.PAGESIZE)
    addr = storage.addr
    assert is_mapped(addr)
    storage.close()
    storage.close()
    assert storage.closed
    assert not is_mapped(addr)


def test_a_closed_storage_refuses_new_views() -> None:
    storage = allocate_system(4096)
    storage.close()
    with pytest.raises(StorageClosedError, match=r"host tier \(G2\).*closed"):
        storage.as_numpy()


def test_the_allocator_spec_allocates_through_this_module() -> None:
    with allocate(SystemAllocator(), 1 << 20) as storage:
        assert isinstance(storage, SystemStorage)
        assert storage.size == 1 << 20


@pytest.mark.parametrize("size", [0, -1, True, 1.5])
def test_a_size_must_be_a_positive_byte_count(size: object) -> None:
    with pytest.raises(KvbmError, match=r"host tier \(G2\): size must be a positive number of bytes"):
        allocate_system(size)  # type: ignore[arg-type]


def test_a_forgotten_storage_is_released_when_collected_and_says_so() -> None:
    storage = allocate_system(4096)
    addr = storage.addr
    with pytest.warns(ResourceWarning, match="unclosed SystemStorage"):
        del storage
        gc.collect()
    assert not is_mapped(addr)


def test_a_view_keeps_a_forgotten_storage_alive() -> None:
    view = allocate_system(4096).as_numpy()
    gc.collect()
    view[:] = 3  # still mapped: the view holds the storage
    assert int(view.sum()) == 3 * 4096
    with pytest.warns(ResourceWarning):
        del view
        gc.collect()


def test_as_torch_is_a_zero_copy_cpu_tensor() -> None:
    torch = pytest.importorskip("torch")
    with allocate_system(4096) as storage:
        tensor = storage.as_torch()
        tensor[:10] = 9
        assert tensor.dtype == torch.uint8 and tensor.device.type == "cpu"
        assert storage.as_numpy()[:10].tolist() == [9] * 10


def test_importing_storage_imports_neither_cupy_nor_nixl() -> None:
    import subprocess

    code = "import kvbm_builder.storage, sys; print('cupy' in sys.modules, 'nixl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(min_value=1, max_value=5 * mmap.PAGESIZE + 17))
def test_every_byte_of_any_size_is_usable(size: int) -> None:
    with allocate_system(size) as storage:
        view = storage.as_numpy()
        assert storage.size == size == view.size
        view[:] = 0xAB
        assert int(view.sum()) == 0xAB * size


# --- releasing: exactly once, even when interrupted ------------------------------------------------------


def test_an_interrupted_close_leaves_the_storage_open_and_closing_again_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = allocate_system(3 * mmap.PAGESIZE)
    real_close = _libc.close_mapping

    def interrupted(memory: mmap.mmap) -> None:
        monkeypatch.setattr(_libc, "close_mapping", real_close)
        raise KeyboardInterrupt  # Ctrl-C just before the call

    monkeypatch.setattr(_libc, "close_mapping", interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.close()
    assert not storage.closed and is_mapped(storage.addr)
    with pytest.raises(StorageClosedError, match=r"being closed \(close\(\) did not finish; call it again\)"):
        storage.as_numpy()
    storage.close()
    assert storage.closed and not is_mapped(storage.addr)


def test_an_interrupt_after_munmap_never_unmaps_what_was_mapped_there_since(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = allocate_system(3 * mmap.PAGESIZE)
    real_close = _libc.close_mapping

    def interrupted_on_return(memory: mmap.mmap) -> None:
        real_close(memory)
        raise KeyboardInterrupt  # a signal during munmap is raised once it returns

    monkeypatch.setattr(_libc, "close_mapping", interrupted_on_return)
    with pytest.raises(KeyboardInterrupt):
        storage.close()
    monkeypatch.undo()
    assert not is_mapped(storage.addr)
    with allocate_system(3 * mmap.PAGESIZE) as newer:  # the kernel may well hand out the same range again
        storage.close()  # the retry must leave the newer storage's memory alone
        assert storage.closed
        newer.as_numpy()[:] = 5
        assert int(newer.as_numpy().sum()) == 5 * newer.size


def test_a_refused_release_names_the_tier_and_can_be_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = allocate_system(4096)

    def refused(memory: mmap.mmap) -> None:
        raise OSError(errno.EINVAL, "munmap: Invalid argument")

    monkeypatch.setattr(_libc, "close_mapping", refused)
    with pytest.raises(AllocationError, match=r"host tier \(G2\): releasing SystemStorage.*munmap: Invalid argument"):
        storage.close()
    assert not storage.closed and is_mapped(storage.addr)
    monkeypatch.undo()
    storage.close()
    assert storage.closed and not is_mapped(storage.addr)


# --- sizes the C calls cannot take -----------------------------------------------------------------------


@given(size=st.integers(min_value=2**63, max_value=2**70))
def test_a_size_beyond_2_63_is_refused_before_anything_is_mapped(size: int) -> None:
    # ctypes would wrap 2**64 + 4096 to 4096 and hand back a page claiming to hold 2**64 + 4096 bytes
    with pytest.raises(AllocationError, match=rf"host tier \(G2\): cannot allocate {size} bytes: .*most {2**63 - 1}"):
        allocate_system(size)


@pytest.mark.parametrize("length", [-1, 2**63, 2**64 + 4096])
def test_libc_refuses_numbers_its_c_arguments_cannot_hold(length: int) -> None:
    with pytest.raises(OSError, match="outside the C argument's range") as caught:
        _libc.map_anonymous(length)
    assert caught.value.errno == errno.EOVERFLOW


def test_every_storage_kind_knows_its_tier() -> None:
    assert {kind: kind.tier.name for kind in StorageKind} == {
        StorageKind.DEVICE: "G1",
        StorageKind.PINNED: "G2",
        StorageKind.SYSTEM: "G2",
        StorageKind.DISK: "G3",
    }
    assert all(kind in kind.tier.accepts for kind in StorageKind)
