"""What every storage shares: it owns one resource and releases it exactly once, deterministically."""

from __future__ import annotations

import logging
import threading
import warnings
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from ..config.protocols import StorageKind, Tier
from ..config.sizes import format_bytes
from ..errors import KvbmError

log = logging.getLogger("kvbm_builder.storage")
_S = TypeVar("_S", bound="OwnedStorage")

TIER_OF_KIND = {
    StorageKind.DEVICE: Tier.G1,
    StorageKind.PINNED: Tier.G2,
    StorageKind.SYSTEM: Tier.G2,
    StorageKind.DISK: Tier.G3,
}


def tier_words(kind: StorageKind) -> str:
    """``StorageKind.PINNED`` -> ``host tier (G2)``: how errors name a storage's tier."""
    return TIER_OF_KIND[kind].words


class StorageClosedError(KvbmError, ValueError):
    """A storage was used after ``close()``: its memory or file is gone."""


def human(nbytes: int) -> str:
    """``4096`` -> ``4096 bytes``, ``3145728`` -> ``3.0 MiB``; large sizes in both GiB and GB."""
    if nbytes >= 2**30:
        return format_bytes(nbytes)
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes} bytes"


def check_size(size: object, kind: StorageKind) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise KvbmError(f"{tier_words(kind)}: size must be a positive number of bytes, got {size!r}")
    return size


class OwnedStorage:
    """One allocation of a tier. ``close()`` releases it (idempotent); so does leaving a ``with`` block.

    Views (``as_numpy()``, ``as_cupy()``, ...) keep the storage object alive, so garbage collection never
    frees memory under a live view; an explicit ``close()`` does, and such views must not be used after it.
    """

    kind: ClassVar[StorageKind]

    def __init__(self, addr: int, size: int, device_id: int) -> None:
        self._addr = addr
        self._size = size
        self._device_id = device_id
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def addr(self) -> int:
        """Start address (for disk: the file offset base, 0)."""
        return self._addr

    @property
    def size(self) -> int:
        """Usable bytes: at least what was asked for."""
        return self._size

    @property
    def device_id(self) -> int:
        """NIXL's devId: the GPU ordinal for device memory, 0 for host memory, the fd for a file."""
        return self._device_id

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the memory or file now. Safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._release()

    def _release(self) -> None:
        raise NotImplementedError

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise StorageClosedError(f"{tier_words(self.kind)}: cannot {what}: this {self!r} is closed")

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        try:
            warnings.warn(f"unclosed {self!r}; call close() or use it as a context manager", ResourceWarning, 2)
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def _repr_extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        state = "closed" if getattr(self, "_closed", True) else "open"
        return f"{type(self).__name__}({human(self._size)} at 0x{self._addr:x}{self._repr_extra()}, {state})"


def numpy_view(addr: int, size: int, owner: OwnedStorage) -> Any:
    """A zero-copy numpy uint8 array over ``[addr, addr + size)`` that keeps ``owner`` alive."""
    import ctypes

    try:
        import numpy as np
    except ImportError as exc:
        raise KvbmError(f"as_numpy() needs numpy: pip install numpy ({exc})") from exc
    raw = (ctypes.c_uint8 * size).from_address(addr)
    raw._kvbm_owner = owner  # type: ignore[attr-defined]  # the view's base holds the storage
    return np.frombuffer(memoryview(raw), dtype=np.uint8)


def torch_from_numpy(array: Any) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise KvbmError(f"as_torch() needs torch: pip install torch ({exc})") from exc
    return torch.from_numpy(array)
