"""The GPU side of transfers: the batched copy kernel, the engine's streams, and its pinned buffers.

cupy is imported here, at module level: this module is imported only when a transfer touches a GPU.

Each in-flight slot owns one non-blocking CUDA stream and two *lanes*. A lane is a pinned table buffer (the
kernel's (src, dst, size) triples), a device table buffer, a pinned staging buffer (made on first use) and an event.
A plain device transfer uses one lane; a staged one (through pinned memory, to pageable memory or disk)
alternates between both, so the GPU copies one chunk while the CPU reads or writes the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from pathlib import Path
from typing import Any

import cupy
import numpy as np

from ..config.protocols import Storage, StorageKind
from ..storage import _cuda as storage_cuda
from ._hostio import StepError
from ._table import RegionTable

__all__ = ["CudaContext", "Lane", "Slot"]

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction from the pointers (UVA)
_HOST_ALLOC_PORTABLE_MAPPED = 0x01 | 0x02  # cudaHostAllocPortable | cudaHostAllocMapped
_TYPE_HOST, _TYPE_DEVICE = 1, 2  # cudaMemoryTypeHost, cudaMemoryTypeDevice
_KERNEL_SOURCE = Path(__file__).with_name("copy_kernel.cu")


class KernelConfig:
    """How the copy kernel is launched; the defaults are what ``benchmarks/bench_transfer.py`` found fastest."""

    __slots__ = ("max_grid", "piece_bytes", "table_on_device", "threads", "unroll")

    def __init__(
        self,
        *,
        piece_bytes: int = 64 * 2**10,
        threads: int = 256,
        unroll: int = 4,
        max_grid: int = 0,
        table_on_device: bool = True,
    ) -> None:
        self.piece_bytes = piece_bytes  # runs are cut into pieces of at most this, one thread block each
        self.threads = threads
        self.unroll = unroll
        self.max_grid = max_grid  # 0: one thread block per piece; else a grid-stride loop over at most this many
        self.table_on_device = table_on_device  # copy the table to GPU memory first, or read it from pinned memory

    def __repr__(self) -> str:
        return (
            f"KernelConfig(piece_bytes={self.piece_bytes}, threads={self.threads}, unroll={self.unroll}, "
            f"max_grid={self.max_grid}, table_on_device={self.table_on_device})"
        )


class Lane:
    """One copy in flight on a slot's stream: its table buffers, its staging buffer and its event."""

    __slots__ = ("dev_table", "dev_table_bytes", "event", "host_table", "host_table_ptr", "staging")

    def __init__(self) -> None:
        self.event = cupy.cuda.Event(block=False, disable_timing=True)
        self.host_table: Any = None  # numpy uint64 view over pinned memory
        self.host_table_ptr = 0
        self.dev_table = 0
        self.dev_table_bytes = 0
        self.staging: Storage | None = None


class Slot:
    """One of ``max_concurrent`` places a batch runs in: a non-blocking stream and two lanes."""

    __slots__ = ("index", "lanes", "stream")

    def __init__(self, index: int) -> None:
        self.index = index
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.lanes = (Lane(), Lane())


class CudaContext:
    """The engine's CUDA resources on GPU ``device_id``; every CUDA call runs with that device current."""

    def __init__(self, device_id: int, slots: int, config: KernelConfig) -> None:
        self.device_id = device_id
        self.config = config
        self.device = cupy.cuda.Device(device_id)
        self._lock = threading.Lock()
        self._memory: dict[int, tuple[int, int, int]] = {}  # id(storage) -> (addr, size, device delta)
        self._broken: BaseException | None = None
        with self.device:
            self.kernel = _compile(config.unroll)
            self.slots = [Slot(i) for i in range(slots)]
            self.sm_count = int(cupy.cuda.runtime.deviceGetAttribute(16, device_id))  # MultiProcessorCount

    # --- memory checks -------------------------------------------------------------------------------------

    def device_delta(self, storage: Storage, what: str) -> int | None:
        """Check that ``storage`` is what its kind says, as CUDA sees it; its (device - host) address delta
        for mapped pinned memory (0 for device memory), or None when the GPU cannot address it directly."""
        key = id(storage)
        cached = self._memory.get(key)
        if cached is not None and cached[:2] == (storage.addr, storage.size):
            return cached[2]
        runtime = cupy.cuda.runtime
        with self.device:
            try:
                attributes = runtime.pointerGetAttributes(storage.addr)
            except runtime.CUDARuntimeError as exc:
                raise StepError("check memory", f"{what}: CUDA does not know address {storage.addr:#x}: {exc}") from exc
        kind = storage.kind
        memory_type = int(attributes.type)
        if kind is StorageKind.DEVICE:
            if memory_type != _TYPE_DEVICE or int(attributes.device) != self.device_id:
                raise StepError(
                    "check memory",
                    f"{what}: address {storage.addr:#x} is not memory of GPU {self.device_id} (CUDA says type "
                    f"{memory_type}, device {int(attributes.device)}); was the storage freed or made on another GPU?",
                )
            delta: int | None = 0
        elif kind is StorageKind.PINNED:
            if memory_type != _TYPE_HOST:
                raise StepError(
                    "check memory",
                    f"{what}: address {storage.addr:#x} is not page-locked host memory (CUDA says type {memory_type});"
                    " a pinned storage must be registered with cudaHostRegister or come from cudaHostAlloc",
                )
            device_pointer = int(attributes.devicePointer or 0)
            host_pointer = int(attributes.hostPointer or storage.addr)
            delta = device_pointer - host_pointer if device_pointer else None
        else:
            delta = None
        with self._lock:
            self._memory[key] = (storage.addr, storage.size, delta if delta is not None else _NO_ALIAS)
        return delta

    def forget(self, storage: Storage) -> None:
        with self._lock:
            self._memory.pop(id(storage), None)

    # --- copies --------------------------------------------------------------------------------------------

    def enqueue(self, slot: Slot, lane: Lane, table: RegionTable, method: str, deltas: tuple[Any, Any]) -> None:
        """Put the copies of ``table`` on the slot's stream (``kernel`` or ``memcpy``), then record the lane's
        event. ``deltas`` are per-side arrays (or ints) added to addresses for the kernel (pinned host aliases)."""
        runtime = cupy.cuda.runtime
        stream = slot.stream
        with self.device:
            if method == "memcpy":
                step = "cudaMemcpyAsync"
                try:
                    for s, d, n in zip(table.src.tolist(), table.dst.tolist(), table.size.tolist(), strict=True):
                        runtime.memcpyAsync(d, s, n, _MEMCPY_DEFAULT, stream.ptr)
                except runtime.CUDARuntimeError as exc:
                    raise StepError(step, f"cudaMemcpyAsync failed: {exc}") from exc
            else:
                step = "copy kernel"
                try:
                    self._launch(stream, lane, table, deltas)
                except runtime.CUDARuntimeError as exc:
                    raise StepError(step, f"launching the copy kernel failed: {exc}") from exc
            try:
                lane.event.record(stream)
            except runtime.CUDARuntimeError as exc:
                raise StepError(step, f"recording the completion event failed: {exc}") from exc

    def _launch(self, stream: Any, lane: Lane, table: RegionTable, deltas: tuple[Any, Any]) -> None:
        config = self.config
        src, dst, size = table.src, table.dst, table.size
        if not isinstance(deltas[0], int) or deltas[0]:
            src = src + (deltas[0] if isinstance(deltas[0], int) else deltas[0][table.src_storage])
        if not isinstance(deltas[1], int) or deltas[1]:
            dst = dst + (deltas[1] if isinstance(deltas[1], int) else deltas[1][table.dst_storage])
        src, dst, size = split_pieces(src, dst, size, config.piece_bytes)
        n = int(size.shape[0])
        if n == 0:
            return
        host = self._host_table(lane, n)
        host[:n, 0] = src
        host[:n, 1] = dst
        host[:n, 2] = size
        nbytes = n * 24
        if config.table_on_device:
            if lane.dev_table_bytes < nbytes:
                self._grow_device_table(lane, nbytes)
            cupy.cuda.runtime.memcpyAsync(lane.dev_table, lane.host_table_ptr, nbytes, _MEMCPY_DEFAULT, stream.ptr)
            table_ptr = lane.dev_table
        else:
            table_ptr = lane.host_table_ptr  # mapped pinned memory: the GPU reads the table over PCIe
        grid = n if config.max_grid <= 0 else min(n, config.max_grid)
        self.kernel((grid,), (config.threads,), (np.uint64(table_ptr), np.uint32(n)), stream=stream)

    def _host_table(self, lane: Lane, n: int) -> Any:
        if lane.host_table is None or lane.host_table.shape[0] < n:
            capacity = max(n, 4096)
            old = lane.host_table_ptr
            ptr = int(cupy.cuda.runtime.hostAlloc(capacity * 24, _HOST_ALLOC_PORTABLE_MAPPED))
            lane.host_table_ptr = ptr
            lane.host_table = np.ctypeslib.as_array((_U64 * (capacity * 3)).from_address(ptr)).reshape(capacity, 3)
            if old:
                cupy.cuda.runtime.freeHost(old)
        return lane.host_table

    def _grow_device_table(self, lane: Lane, nbytes: int) -> None:
        capacity = max(nbytes, 4096 * 24)
        if lane.dev_table:
            cupy.cuda.runtime.free(lane.dev_table)
            lane.dev_table, lane.dev_table_bytes = 0, 0
        lane.dev_table = int(cupy.cuda.runtime.malloc(capacity))
        lane.dev_table_bytes = capacity

    def wait(self, lane: Lane, step: str) -> None:
        """Block (without the GIL) until the lane's last copy finished; a CUDA error is raised as a StepError."""
        try:
            lane.event.synchronize()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            self._broken = exc
            raise StepError(step, f"the GPU reported an error while copying: {exc}") from exc

    def synchronize(self, slot: Slot) -> None:
        """Wait for everything on the slot's stream; errors are swallowed (the caller reports its own)."""
        with contextlib.suppress(Exception):
            slot.stream.synchronize()

    @property
    def broken(self) -> BaseException | None:
        """The CUDA error that left the context unusable (a failed kernel poisons it for the process)."""
        return self._broken

    # --- staging -------------------------------------------------------------------------------------------

    def staging(self, lane: Lane, nbytes: int) -> Storage:
        """The lane's pinned staging buffer, at least ``nbytes`` long (made or grown on demand)."""
        if lane.staging is not None and lane.staging.size >= nbytes:
            return lane.staging
        from ..config.allocators import PinnedAllocator
        from ..storage.pinned import allocate_pinned

        old, lane.staging = lane.staging, None
        if old is not None:
            old.close()  # type: ignore[attr-defined]
        lane.staging = allocate_pinned(nbytes, PinnedAllocator(device_id=self.device_id))
        return lane.staging

    def staging_bytes(self) -> int:
        return sum(lane.staging.size for slot in self.slots for lane in slot.lanes if lane.staging is not None)

    def close(self) -> None:
        """Free every buffer, stream and event (after whatever is still queued has run)."""
        runtime = cupy.cuda.runtime
        with self.device:
            for slot in self.slots:
                self.synchronize(slot)
                for lane in slot.lanes:
                    if lane.staging is not None:
                        try:
                            lane.staging.close()  # type: ignore[attr-defined]
                        finally:
                            lane.staging = None
                    if lane.host_table_ptr:
                        _quietly(runtime.freeHost, lane.host_table_ptr)
                        lane.host_table_ptr, lane.host_table = 0, None
                    if lane.dev_table:
                        _quietly(runtime.free, lane.dev_table)
                        lane.dev_table, lane.dev_table_bytes = 0, 0
            self.slots = []
        self._memory.clear()


_NO_ALIAS: Any = None
_U64 = ctypes.c_uint64


def _quietly(call: Any, *args: Any) -> None:
    with contextlib.suppress(Exception):  # a context already torn down at exit: nothing left to free
        call(*args)


def split_pieces(src: Any, dst: Any, size: Any, piece: int) -> tuple[Any, Any, Any]:
    """Runs cut into pieces of at most ``piece`` bytes (cuts at multiples of ``piece`` from each run's start)."""
    if size.shape[0] == 0 or int(size.max()) <= piece:
        return src, dst, size
    counts = (size + piece - 1) // piece
    run = np.repeat(np.arange(size.shape[0]), counts)
    first = np.cumsum(counts) - counts
    offset = (np.arange(run.shape[0]) - np.repeat(first, counts)) * piece
    return src[run] + offset, dst[run] + offset, np.minimum(piece, size[run] - offset)


_compiled: dict[tuple[int, int], Any] = {}
_compile_lock = threading.Lock()


def _compile(unroll: int) -> Any:
    """The kernel for the current device, compiled once per process (and cached on disk by cupy)."""
    key = (cupy.cuda.runtime.getDevice(), unroll)
    with _compile_lock:
        kernel = _compiled.get(key)
        if kernel is None:
            module = cupy.RawModule(code=_KERNEL_SOURCE.read_text(), options=(f"-DKVBM_UNROLL={unroll}",))
            kernel = module.get_function("kvbm_copy")
            _compiled[key] = kernel
        return kernel


def cuda_reason() -> str | None:
    return storage_cuda.cuda_unavailable_reason()
