"""What every storage shares: it owns one resource and releases it exactly once, deterministically."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from ..config.protocols import StorageKind
from ..config.sizes import MAX_BYTES, format_bytes
from ..errors import AllocationError, MissingDependencyError, StorageClosedError

log = logging.getLogger("kvbm_builder.storage")
_S = TypeVar("_S", bound="OwnedStorage")


def add_note(error: BaseException, text: str) -> None:
    """``error.add_note(text)`` (Python 3.11+); logged on older Pythons."""
    if hasattr(error, "add_note"):
        error.add_note(text)
    else:
        log.error(text)


def check_size(size: object, kind: StorageKind, *, limit: int = MAX_BYTES) -> int:
    """``size`` when it is a byte count one storage can hold: positive, and at most ``limit`` (2**63 - 1, what
    the C calls take: beyond it ctypes would wrap the number silently and map far less than asked)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise AllocationError(f"{kind.tier.words}: size must be a positive number of bytes, got {size!r}")
    if size > limit:
        raise AllocationError(
            f"{kind.tier.words}: cannot allocate {size} bytes: one storage holds at most {limit} bytes; "
            "make the tier smaller (num_blocks, or the model's page_size, inner_dim or num_layers)"
        )
    return size


class OwnedStorage:
    """One allocation of a tier. ``close()`` releases it (idempotent); so does leaving a ``with`` block, and so
    does garbage collection of a storage nobody closed (with a ResourceWarning).

    Memory is never freed under a live view. A view (``as_numpy()``, ``as_cupy()``, ``as_torch()``, a view of one
    of those, a DLPack capsule or tensor made from one) holds the memory itself, and the storage object too.
    ``close()`` while views exist gives up the storage's hold at once: the storage is closed (new views, reads and
    writes are refused) and the memory is released when the last view is gone. Raw addresses (``addr``,
    ``memory_region(...).addr``) hold nothing: do not use them after ``close()``.
    """

    kind: ClassVar[StorageKind]

    def __init__(self, addr: int, size: int, device_id: int) -> None:
        self._addr = addr
        self._size = size
        self._device_id = device_id
        self._closed = False
        self._closing = False  # close() started: the storage may be partly released, refuse new use
        self._close_lock = threading.Lock()  # one close() at a time
        self._state = threading.Condition()  # guards _closing and _busy
        self._busy = 0  # reads and writes in flight: close() waits for them, never pulls a descriptor from under one

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
        """Release the memory or file now. Safe to call twice.

        Memory that a view still uses is left to the views and released with the last of them (never under a
        live view); the storage is closed either way. The storage counts as closed only once everything is
        released: if releasing fails (an AllocationError naming the step) or is interrupted, it stays open,
        refuses new use, and calling close() again finishes the job. Each step is done at most once, so a retry
        never frees memory that was handed out again."""
        with self._close_lock:
            if self._closed:
                return
            with self._state:
                self._closing = True
                while self._busy:
                    self._state.wait()
            try:
                self._release()
            except OSError as exc:
                raise AllocationError(
                    f"{self.kind.tier.words}: releasing {self!r} failed: {exc}; it stays open: call close() again"
                ) from exc
            self._closed = True

    def _release(self) -> None:
        """Free what the storage holds; called until it returns. Must not redo a step that succeeded."""
        raise NotImplementedError

    @contextmanager
    def in_use(self, what: str = "use it") -> Iterator[None]:
        """Hold the storage open for one operation (a read, a write, a transfer through its address or descriptor):
        StorageClosedError once closing has started, and close() waits until every such operation is over."""
        with self._state:
            self._check_open(what)
            self._busy += 1
        try:
            yield
        finally:
            with self._state:
                self._busy -= 1
                if not self._busy:
                    self._state.notify_all()

    def _check_open(self, what: str) -> None:
        if self._closing:
            state = "closed" if self._closed else "being closed (close() did not finish; call it again)"
            raise StorageClosedError(f"{self.kind.tier.words}: cannot {what}: this {self!r} is {state}")

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
        return f"{type(self).__name__}({format_bytes(self._size)} at 0x{self._addr:x}{self._repr_extra()}, {state})"


def numpy_view(memory: object, offset: int, size: int, owner: OwnedStorage) -> Any:
    """A zero-copy numpy uint8 array over ``size`` bytes at ``offset`` of ``memory`` (an object that owns the memory
    and exports it as a writable buffer: an ``mmap.mmap``, cupy's ``PinnedMemoryPointer``). The array holds an export
    of ``memory``, so the memory outlives ``owner.close()`` for as long as the array (or any view of it) lives, and
    it holds ``owner``."""
    import ctypes

    try:
        import numpy as np
    except ImportError as exc:
        raise MissingDependencyError(f"as_numpy() needs numpy: pip install numpy ({exc})") from exc
    raw = (ctypes.c_uint8 * size).from_buffer(memory, offset)  # type: ignore[arg-type]
    raw._kvbm_owner = owner  # type: ignore[attr-defined]  # the view's base holds the storage too
    return np.frombuffer(raw, dtype=np.uint8)  # type: ignore[call-overload]  # a ctypes array is a buffer


def torch_from_numpy(array: Any) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(f"as_torch() needs torch: pip install torch ({exc})") from exc
    return torch.from_numpy(array)
