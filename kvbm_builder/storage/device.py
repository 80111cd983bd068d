"""G1: GPU memory, one exact ``cudaMalloc`` per storage (never cupy's caching pool), freed on close."""

from __future__ import annotations

from typing import Any, ClassVar

from ..config.protocols import StorageKind
from ..errors import AllocationError, KvbmError
from . import _cuda
from ._base import OwnedStorage, check_size, human, log

_TIER = StorageKind.DEVICE.tier.words


class DeviceStorage(OwnedStorage):
    """``size`` bytes of memory on GPU ``device_id``."""

    kind: ClassVar[StorageKind] = StorageKind.DEVICE

    def __init__(self, addr: int, size: int, device_id: int) -> None:
        super().__init__(addr, size, device_id)
        self._freed = False

    def as_cupy(self) -> Any:
        """A zero-copy ``cupy.uint8`` array over the memory. Do not use it after ``close()``."""
        self._check_open("make a cupy view")
        import cupy

        memory = cupy.cuda.UnownedMemory(self._addr, self._size, self, self._device_id)
        return cupy.ndarray((self._size,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))

    def as_torch(self) -> Any:
        """A zero-copy ``torch.uint8`` CUDA tensor (through DLPack). Do not use it after ``close()``."""
        array = self.as_cupy()
        try:
            from torch.utils.dlpack import from_dlpack
        except ImportError as exc:
            raise KvbmError(f"as_torch() needs torch: pip install torch ({exc})") from exc
        return from_dlpack(array)

    def _release(self) -> None:
        import cupy

        if self._freed:
            return
        # marked first: if close() is interrupted after cudaFree, a retry must not free the address again
        # (CUDA may have handed it out since); a failure is logged, CUDA offers no way to retry it
        self._freed = True
        try:
            with cupy.cuda.Device(self._device_id):
                cupy.cuda.runtime.free(self._addr)
        except Exception as exc:  # the context may already be torn down at interpreter exit
            log.warning("%s: cudaFree of %r failed: %s", _TIER, self, exc)

    def _repr_extra(self) -> str:
        return f" on GPU {self._device_id}"


def allocate_device(size: int, device_id: int) -> DeviceStorage:
    """``size`` bytes on GPU ``device_id`` from ``cudaMalloc`` (256-byte aligned, exact size)."""
    check_size(size, StorageKind.DEVICE)
    cupy = _cuda.require_cuda(
        _TIER, device_id, "The device tier needs a GPU; leave device_layout out on machines without one"
    )
    runtime = cupy.cuda.runtime
    with cupy.cuda.Device(device_id):
        try:
            ptr = runtime.malloc(size)
        except runtime.CUDARuntimeError as exc:
            raise _malloc_error(cupy, size, device_id, exc) from exc
    return DeviceStorage(int(ptr), size, device_id)


def _malloc_error(cupy: Any, size: int, device_id: int, exc: Exception) -> AllocationError:
    try:
        free, total = cupy.cuda.runtime.memGetInfo()
        memory = f"{human(free)} free of {human(total)} (cudaMemGetInfo)"
    except Exception:
        memory = "free memory unknown"
    if _cuda.cuda_error_code(exc) == _cuda.ERROR_MEMORY_ALLOCATION:
        return AllocationError(
            f"{_TIER}: out of memory on GPU {device_id}: asked for {human(size)}, {memory}. "
            "Lower num_blocks of device_layout, or free GPU memory (other processes; a framework's "
            "cache, e.g. torch.cuda.empty_cache(); a lower gpu_memory_utilization)"
        )
    return AllocationError(f"{_TIER}: cudaMalloc of {human(size)} on GPU {device_id} failed: {exc}; {memory}")
