"""G1: GPU memory, one exact ``cudaMalloc`` per storage (never cupy's caching pool), freed on close.

The allocation is cupy's ``Memory`` (cudaMalloc in its constructor, cudaFree when the last reference goes): it has
an owner from the moment it exists, so no interrupt can leak it, and cupy views (and torch tensors made from them
through DLPack) hold it, so it outlives ``close()`` for as long as they do.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..config.protocols import StorageKind
from ..config.sizes import format_bytes
from ..errors import AllocationError, MissingDependencyError
from . import _cuda
from ._base import OwnedStorage, check_size

_TIER = StorageKind.DEVICE.tier.words


class DeviceStorage(OwnedStorage):
    """``size`` bytes of memory on GPU ``device_id``."""

    kind: ClassVar[StorageKind] = StorageKind.DEVICE

    def __init__(self, memory: Any, size: int, device_id: int) -> None:
        super().__init__(int(memory.ptr), size, device_id)
        self._memory: Any = memory  # cupy.cuda.Memory; None once close() let go of it

    def as_cupy(self) -> Any:
        """A zero-copy ``cupy.uint8`` array over the memory. It holds the memory (and this storage): after
        ``close()`` it still works, and the memory is freed when the last such view is gone."""
        import cupy

        with self._state:
            self._check_open("make a cupy view")
            owner = (self, self._memory)
        memory = cupy.cuda.UnownedMemory(self._addr, self._size, owner, self._device_id)
        return cupy.ndarray((self._size,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))

    def as_torch(self) -> Any:
        """A zero-copy ``torch.uint8`` CUDA tensor (through DLPack); like :meth:`as_cupy`, it holds the memory."""
        array = self.as_cupy()
        try:
            from torch.utils.dlpack import from_dlpack
        except ImportError as exc:
            raise MissingDependencyError(f"as_torch() needs torch: pip install torch ({exc})") from exc
        return from_dlpack(array)

    def _release(self) -> None:
        import cupy

        # dropping our reference frees the memory (cudaFree, once) unless a view still holds it: then the last
        # view does; a retry after an interrupt finds nothing left to drop
        with cupy.cuda.Device(self._device_id):
            self._memory = None

    def _repr_extra(self) -> str:
        return f" on GPU {self._device_id}"


def allocate_device(size: int, device_id: int) -> DeviceStorage:
    """``size`` bytes on GPU ``device_id`` from ``cudaMalloc`` (256-byte aligned, exact size)."""
    check_size(size, StorageKind.DEVICE)
    cupy = _cuda.require_cuda(
        _TIER, device_id, "The device tier needs a GPU; leave device_layout out on machines without one"
    )
    runtime = cupy.cuda.runtime
    memory: Any = None
    try:
        with cupy.cuda.Device(device_id):
            try:
                memory = cupy.cuda.Memory(size)  # owned from the start: dropped on any failure, it frees itself
            except runtime.CUDARuntimeError as exc:
                raise _malloc_error(cupy, size, device_id, exc) from exc
        return DeviceStorage(memory, size, device_id)
    finally:
        with cupy.cuda.Device(device_id):
            memory = None  # the storage holds it now; after a failure nothing does, and it is freed here


def _malloc_error(cupy: Any, size: int, device_id: int, exc: Exception) -> AllocationError:
    try:
        free, total = cupy.cuda.runtime.memGetInfo()
        memory = f"{format_bytes(free)} free of {format_bytes(total)} (cudaMemGetInfo)"
    except Exception:
        memory = "free memory unknown"
    if _cuda.cuda_error_code(exc) == _cuda.ERROR_MEMORY_ALLOCATION:
        return AllocationError(
            f"{_TIER}: out of memory on GPU {device_id}: asked for {format_bytes(size)}, {memory}. "
            "Lower num_blocks of device_layout, or free GPU memory (other processes; a framework's "
            "cache, e.g. torch.cuda.empty_cache(); a lower gpu_memory_utilization)"
        )
    return AllocationError(f"{_TIER}: cudaMalloc of {format_bytes(size)} on GPU {device_id} failed: {exc}; {memory}")
