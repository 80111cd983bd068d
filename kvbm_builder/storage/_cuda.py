"""CUDA through cupy, imported on first use only.

``import kvbm_builder.storage`` never imports cupy: every function here imports it inside.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..errors import GpuUnavailableError
from . import _host

#: cudaHostRegisterPortable: the registration is seen by every CUDA context, not only the current one.
HOST_REGISTER_PORTABLE = 0x01
#: cudaHostAllocPortable / cudaHostAllocWriteCombined
HOST_ALLOC_PORTABLE = 0x01
HOST_ALLOC_WRITE_COMBINED = 0x04
#: cudaMemoryTypeHost, as cudaPointerGetAttributes reports page-locked host memory
MEMORY_TYPE_HOST = 1
#: cudaErrorMemoryAllocation
ERROR_MEMORY_ALLOCATION = 2
#: cudaErrorHostMemoryNotRegistered: cudaHostUnregister of a range CUDA does not hold
ERROR_HOST_MEMORY_NOT_REGISTERED = 713


@lru_cache(maxsize=1)
def _probe() -> tuple[int, str | None]:
    """(number of visible GPUs, why CUDA cannot be used or None). Probed once per process."""
    try:
        import cupy
    except ImportError as exc:
        return 0, f"cupy is not installed ({exc}); pip install 'kvbm-builder[cuda13]' (or [cuda12])"
    except Exception as exc:  # a broken CUDA install can fail in many ways at import
        return 0, f"cupy failed to import: {exc}"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return 0, f"the CUDA runtime cannot be used: {exc}"
    if count == 0:
        return 0, "no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return count, None


def cuda_available() -> bool:
    """True when cupy imports and at least one GPU is visible. Cheap after the first call (cached)."""
    return _probe()[0] > 0


def cuda_unavailable_reason() -> str | None:
    """Why :func:`cuda_available` is False, in words; None when CUDA can be used."""
    return _probe()[1]


def require_cuda(tier: str, device_id: int, what_to_do: str) -> Any:
    """The cupy module, once CUDA and GPU ``device_id`` are known to be usable; else GpuUnavailableError."""
    count, reason = _probe()
    if reason is not None:
        raise GpuUnavailableError(f"{tier}: CUDA cannot be used: {reason}. {what_to_do}")
    if not 0 <= device_id < count:
        raise GpuUnavailableError(
            f"{tier}: device_id {device_id} does not exist: {count} GPU(s) visible (ids 0..{count - 1}); "
            "choose another device_id or check CUDA_VISIBLE_DEVICES"
        )
    import cupy

    return cupy


def cuda_error_code(exc: BaseException) -> int | None:
    """The cudaError_t status of a cupy CUDARuntimeError, else None."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def gpu_numa_node(device_id: int) -> int | None:
    """NUMA node of GPU ``device_id`` (from its PCI bus id), or None when unknown."""
    import cupy

    try:
        bus_id = cupy.cuda.runtime.deviceGetPCIBusId(device_id)
        return _host.pci_numa_node(_host.sysfs_pci_name(bus_id))
    except Exception:
        return None


def is_registered_host(addr: int) -> bool:
    """Whether CUDA holds ``addr`` as page-locked (registered or cudaHostAlloc) host memory."""
    import cupy

    try:
        return int(cupy.cuda.runtime.pointerGetAttributes(addr).type) == MEMORY_TYPE_HOST
    except cupy.cuda.runtime.CUDARuntimeError:
        return False
