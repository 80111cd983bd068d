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

    __slots__ = ("bounce_bytes", "max_grid", "piece_bytes", "table_on_device", "threads", "unroll")

    def __init__(
        self,
        *,
        piece_bytes: int = 64 * 2**10,
        threads: int = 256,
        unroll: int = 4,
        max_grid: int = 0,
        table_on_device: bool = True,
        bounce_bytes: int = 16 * 2**20,
    ) -> None:
        self.piece_bytes = piece_bytes  # runs are cut into pieces of at most this, one thread block each
        self.threads = threads
        self.unroll = unroll
        self.max_grid = max_grid  # 0: one thread block per piece; else a grid-stride loop over at most this many
        self.table_on_device = table_on_device  # copy the table to GPU memory first, or read it from pinned memory
        self.bounce_bytes = bounce_bytes  # method "bounce": the chunk gathered in GPU memory per DMA round

    def __repr__(self) -> str:
        return (
            f"KernelConfig(piece_bytes={self.piece_bytes}, threads={self.threads}, unroll={self.unroll}, "
            f"max_grid={self.max_grid}, table_on_device={self.table_on_device}, bounce_bytes={self.bounce_bytes})"
        )


class Lane:
    """One copy in flight on a slot: its table buffers, its staging (pinned) and scratch (GPU) buffers, its
    completion event, and two events that order the GPU-side rounds of method ``bounce``."""

    __slots__ = (
        "dev_table",
        "dev_table_bytes",
        "event",
        "filled",
        "host_table",
        "host_table_ptr",
        "scratch",
        "scratch_bytes",
        "staging",
        "used",
    )

    def __init__(self) -> None:
        self.event = cupy.cuda.Event(block=False, disable_timing=True)
        self.filled = cupy.cuda.Event(block=False, disable_timing=True)  # bounce: scratch holds a chunk
        self.used = cupy.cuda.Event(block=False, disable_timing=True)  # bounce: scratch may be refilled
        self.host_table: Any = None  # numpy uint64 view over pinned memory
        self.host_table_ptr = 0
        self.dev_table = 0
        self.dev_table_bytes = 0
        self.scratch = 0
        self.scratch_bytes = 0
        self.staging: Storage | None = None


class Slot:
    """One of ``max_concurrent`` places a batch runs in: two non-blocking streams (kernels; DMA rounds of method
    ``bounce``) and two lanes."""

    __slots__ = ("dma", "index", "lanes", "stream")

    def __init__(self, index: int) -> None:
        self.index = index
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.dma = cupy.cuda.Stream(non_blocking=True)
        self.lanes = (Lane(), Lane())


class CudaContext:
    """The engine's CUDA resources on GPU ``device_id``; every CUDA call runs with that device current."""

    def __init__(self, device_id: int, slots: int, config: KernelConfig) -> None:
        self.device_id = device_id
        self.config = config
        self.device = cupy.cuda.Device(device_id)
        self._lock = threading.Lock()
        self._memory: dict[int, tuple[Any, ...]] = {}  # id(storage) -> (addr, size, kind, device delta)
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
        if cached is not None and cached[:3] == (storage.addr, storage.size, storage.kind):
            known: int | None = cached[3]
            return known
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
            self._memory[key] = (storage.addr, storage.size, storage.kind, delta)
        return delta

    def forget(self, storage: Storage) -> None:
        with self._lock:
            self._memory.pop(id(storage), None)

    # --- copies --------------------------------------------------------------------------------------------

    def enqueue(
        self,
        slot: Slot,
        lane: Lane,
        table: RegionTable,
        method: str,
        deltas: tuple[Any, Any],
        host_side: str | None = None,
    ) -> None:
        """Put the copies of ``table`` on the slot's streams, then record the lane's event after the last one.

        ``kernel``: one launch of the copy kernel over the table (addresses plus ``deltas``, the per-side
        offsets of pinned host aliases). ``memcpy``: one ``cudaMemcpyAsync`` per run. ``bounce`` (``host_side``
        ``"src"`` or ``"dst"`` names the pinned side): the GPU gathers the device side into its own scratch
        memory in chunks and the copy engine moves each chunk to or from the host runs, the two overlapping."""
        runtime = cupy.cuda.runtime
        steps = {"memcpy": "cudaMemcpyAsync", "kernel": "copy kernel", "bounce": "bounce copy"}
        step = steps[method]
        with self.device:
            try:
                if method == "memcpy":
                    for s, d, n in zip(table.src.tolist(), table.dst.tolist(), table.size.tolist(), strict=True):
                        runtime.memcpyAsync(d, s, n, _MEMCPY_DEFAULT, slot.stream.ptr)
                    lane.event.record(slot.stream)
                elif method == "kernel":
                    src, dst = _shifted(table, deltas)
                    pieces = split_pieces(src, dst, table.size, self.config.piece_bytes)
                    table_ptr = self._upload(slot.stream, lane, [pieces])
                    self._run_kernel(slot.stream, table_ptr, int(pieces[2].shape[0]))
                    lane.event.record(slot.stream)
                else:
                    assert host_side in ("src", "dst")
                    self._bounce(slot, lane, table, host_side)
            except runtime.CUDARuntimeError as exc:
                raise StepError(step, f"queueing the copy ({method}) failed: {exc}") from exc

    def _bounce(self, slot: Slot, lane: Lane, table: RegionTable, host_side: str) -> None:
        """Method ``bounce``: chunks of the batch, each gathered (offload) or scattered (onboard) between the
        device runs and a contiguous scratch buffer by the kernel on ``slot.stream``, and moved between scratch
        and the host runs by DMA on ``slot.dma``; two scratch buffers, so that one chunk's kernel overlaps the
        other's DMA. Events order the two streams on the GPU: the CPU queues everything and returns."""
        runtime = cupy.cuda.runtime
        if len(table) == 0:
            lane.event.record(slot.stream)
            return
        offload = host_side == "dst"
        host, device = (table.dst, table.src) if offload else (table.src, table.dst)
        host_storage = table.dst_storage if offload else table.src_storage
        order = np.argsort(host, kind="stable")
        host, device, size, host_storage = host[order], device[order], table.size[order], host_storage[order]
        start = np.cumsum(size) - size  # place of each run in the batch's packed bytes
        chunk_bytes = self.config.bounce_bytes
        chunk = start // chunk_bytes
        bounds = np.flatnonzero(np.diff(chunk)) + 1
        firsts = np.concatenate((np.zeros(1, dtype=np.int64), bounds))
        lasts = np.concatenate((bounds, np.array([size.shape[0]], dtype=np.int64)))
        chunk_start = start[firsts]
        within = start - np.repeat(chunk_start, lasts - firsts)  # offset inside its chunk's scratch
        need = int((start[lasts - 1] + size[lasts - 1] - chunk_start).max())
        lanes = slot.lanes
        for each in lanes[: len(firsts)]:
            if each.scratch_bytes < need:
                self._grow_scratch(each, need)
        # one table for every chunk's kernel, uploaded once; the kernel of chunk c starts at its first piece
        parts = []
        scratch_of_run = np.asarray([lanes[c % 2].scratch for c in range(len(firsts))], dtype=np.int64)
        scratch = np.repeat(scratch_of_run, lasts - firsts) + within
        for first, last in zip(firsts.tolist(), lasts.tolist(), strict=True):
            a, b = (device, scratch) if offload else (scratch, device)
            parts.append(split_pieces(a[first:last], b[first:last], size[first:last], self.config.piece_bytes))
        table_ptr = self._upload(slot.stream, lane, parts)
        # host extents: neighbouring runs in one host storage and one chunk, back to back on the host side
        joins = (
            (host[1:] == host[:-1] + size[:-1]) & (host_storage[1:] == host_storage[:-1]) & (chunk[1:] == chunk[:-1])
        )
        ext_first = np.concatenate((np.zeros(1, dtype=np.int64), np.flatnonzero(~joins) + 1))
        ext_last = np.concatenate((ext_first[1:], np.array([size.shape[0]], dtype=np.int64)))
        ext_bytes = (start[ext_last - 1] + size[ext_last - 1] - start[ext_first]).tolist()
        ext_host, ext_scratch = host[ext_first].tolist(), scratch[ext_first].tolist()
        ext_chunk = chunk[ext_first].tolist()
        kernel_stream, dma_stream = slot.stream, slot.dma
        offset = 0
        e = 0
        for c, part in enumerate(parts):
            used, filled = lanes[c % 2].used, lanes[c % 2].filled
            n = int(part[2].shape[0])
            extents = []
            while e < len(ext_chunk) and ext_chunk[e] == int(chunk[firsts[c]]):
                extents.append((ext_host[e], ext_scratch[e], ext_bytes[e]))
                e += 1
            if offload:
                if c >= 2:
                    kernel_stream.wait_event(used)  # the DMA of chunk c - 2 has emptied this scratch
                self._run_kernel(kernel_stream, table_ptr + 24 * offset, n)
                filled.record(kernel_stream)
                dma_stream.wait_event(filled)
                for h, sc, nbytes in extents:
                    runtime.memcpyAsync(h, sc, nbytes, _MEMCPY_DEFAULT, dma_stream.ptr)
                used.record(dma_stream)
            else:
                if c >= 2:
                    dma_stream.wait_event(used)  # the kernel of chunk c - 2 has read this scratch
                for h, sc, nbytes in extents:
                    runtime.memcpyAsync(sc, h, nbytes, _MEMCPY_DEFAULT, dma_stream.ptr)
                filled.record(dma_stream)
                kernel_stream.wait_event(filled)
                self._run_kernel(kernel_stream, table_ptr + 24 * offset, n)
                used.record(kernel_stream)
            offset += n
        if offload:
            lane.event.record(dma_stream)
        else:
            lane.event.record(kernel_stream)

    def _upload(self, stream: Any, lane: Lane, parts: list[tuple[Any, Any, Any]]) -> int:
        """Write the (src, dst, size) pieces of ``parts``, one after another, into the lane's pinned table and
        (unless the kernel reads it from pinned memory) copy it to GPU memory on ``stream``; its device address."""
        n = sum(int(part[2].shape[0]) for part in parts)
        host = self._host_table(lane, max(n, 1))
        at = 0
        for src, dst, size in parts:
            k = int(size.shape[0])
            host[at : at + k, 0] = src
            host[at : at + k, 1] = dst
            host[at : at + k, 2] = size
            at += k
        if not self.config.table_on_device:
            return lane.host_table_ptr  # mapped pinned memory: the GPU reads the table over PCIe
        nbytes = max(n, 1) * 24
        if lane.dev_table_bytes < nbytes:
            self._grow_device_table(lane, nbytes)
        cupy.cuda.runtime.memcpyAsync(lane.dev_table, lane.host_table_ptr, nbytes, _MEMCPY_DEFAULT, stream.ptr)
        return lane.dev_table

    def _run_kernel(self, stream: Any, table_ptr: int, n: int) -> None:
        if n == 0:
            return
        config = self.config
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

    def _grow_scratch(self, lane: Lane, nbytes: int) -> None:
        if lane.scratch:
            cupy.cuda.runtime.free(lane.scratch)
            lane.scratch, lane.scratch_bytes = 0, 0
        lane.scratch = int(cupy.cuda.runtime.malloc(nbytes))
        lane.scratch_bytes = nbytes

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
            with self.device:
                lane.event.synchronize()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            self._broken = exc
            raise StepError(step, f"the GPU reported an error while copying: {exc}") from exc

    def synchronize(self, slot: Slot) -> None:
        """Wait for everything on the slot's stream; errors are swallowed (the caller reports its own)."""
        with self.device, contextlib.suppress(Exception):
            slot.stream.synchronize()
            slot.dma.synchronize()

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
                    if lane.scratch:
                        _quietly(runtime.free, lane.scratch)
                        lane.scratch, lane.scratch_bytes = 0, 0
            self.slots = []
        self._memory.clear()


_U64 = ctypes.c_uint64


def _quietly(call: Any, *args: Any) -> None:
    with contextlib.suppress(Exception):  # a context already torn down at exit: nothing left to free
        call(*args)


def _shifted(table: RegionTable, deltas: tuple[Any, Any]) -> tuple[Any, Any]:
    """The table's addresses as the GPU sees them: plus each side's delta (an int, or one per storage)."""
    src, dst = table.src, table.dst
    if not isinstance(deltas[0], int) or deltas[0]:
        src = src + (deltas[0] if isinstance(deltas[0], int) else deltas[0][table.src_storage])
    if not isinstance(deltas[1], int) or deltas[1]:
        dst = dst + (deltas[1] if isinstance(deltas[1], int) else deltas[1][table.dst_storage])
    return src, dst


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
