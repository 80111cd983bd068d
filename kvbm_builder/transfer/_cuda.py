"""The GPU side of transfers: the copy kernels, the engine's streams, and its pinned and GPU buffers.

cupy is imported here, at module level: this module is imported only when a transfer touches a GPU.

Four ways to move a batch between GPU memory and GPU or pinned host memory (``copy_kernel.cu`` has the kernels):

- ``kernel``: ``kvbm_copy_blocks``, one launch per batch. The host writes only the two layouts' strides and base
  addresses and the batch's block ids (a few hundred bytes, copied to the GPU ahead of the kernel); the GPU works
  out every region's address and copies it with 16-byte accesses, reading or writing pinned host memory directly.
- ``table``: ``kvbm_copy`` over a table of every run's (src, dst, size), the general form (for comparison).
- ``memcpy``: the copy engine, when runs are large (1 MiB and more): one ``cuMemcpyBatchAsync`` for all the batch's
  runs where the driver has it (CUDA 12.8+), else one ``cudaMemcpyAsync`` per run.
- ``bounce``: the kernel gathers (or scatters) the device side into GPU scratch memory, chunk by chunk, and the copy
  engine moves each chunk to or from the host blocks, the two overlapping on two streams.

Each in-flight slot owns two non-blocking streams and two *lanes*. A lane is a pinned parameter or table buffer,
its GPU copy, a pinned staging buffer (pageable memory and disk go through it), a GPU scratch buffer (``bounce``)
and events. A plain batch uses one lane; a staged or bounced one alternates between both.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from pathlib import Path
from typing import Any

import cupy
import numpy as np

from ..config.layout import FullyContiguous
from ..config.protocols import Storage, StorageKind
from ..layout import Layout
from ._batch import BatchCopyError, batch_copy
from ._hostio import StepError
from ._kernel import KernelConfig
from ._table import RegionTable

__all__ = ["CudaContext", "GpuSide", "KernelConfig", "Lane", "Slot"]

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction from the pointers (UVA)
_HOST_ALLOC_PORTABLE_MAPPED = 0x01 | 0x02  # cudaHostAllocPortable | cudaHostAllocMapped
_TYPE_HOST, _TYPE_DEVICE = 1, 2  # cudaMemoryTypeHost, cudaMemoryTypeDevice
_KERNEL_SOURCE = Path(__file__).with_name("copy_kernel.cu")
_HEADER = 19  # words of kvbm_copy_blocks' parameter header
_U64 = ctypes.c_uint64


class GpuSide:
    """A layout as the GPU addresses it: ``base[layer or 0] + block * block + layer * layer + outer * outer``.

    ``bases`` are device addresses (pinned host memory through its mapped alias); ``host_bases`` the same for
    ``cudaMemcpyAsync``, which takes host pointers."""

    __slots__ = ("bases", "block", "fully_contiguous", "host_bases", "layer", "outer", "separate")

    def __init__(
        self, block: int, layer: int, outer: int, separate: bool, bases: Any, host_bases: Any, fully: bool
    ) -> None:
        self.block, self.layer, self.outer, self.separate = block, layer, outer, separate
        self.bases, self.host_bases, self.fully_contiguous = bases, host_bases, fully

    @classmethod
    def of(cls, layout: Layout, delta: Any) -> GpuSide:
        spec = layout.spec
        fully = isinstance(spec.layout_type, FullyContiguous)
        host = np.asarray(layout.base_addrs, dtype=np.uint64)
        shift = 0 if delta is None else delta
        bases = host + np.asarray(shift, dtype=np.int64).astype(np.uint64)
        layer = spec.outer_dim * spec.region_bytes if fully else 0
        return cls(spec.block_stride, layer, spec.outer_stride, not fully, bases, host, fully)

    @classmethod
    def packed(cls, addr: int, region_bytes: int, num_layers: int, outer_dim: int) -> GpuSide:
        """Whole blocks back to back from ``addr`` (GPU scratch memory): FullyContiguous without padding."""
        base = np.asarray([addr], dtype=np.uint64)
        return cls(
            num_layers * outer_dim * region_bytes, outer_dim * region_bytes, region_bytes, False, base, base, True
        )


class Lane:
    """One copy in flight on a slot: its buffers and events (see the module's doc)."""

    __slots__ = (
        "dev_params",
        "dev_params_bytes",
        "event",
        "filled",
        "params",
        "params_dev_ptr",
        "params_ptr",
        "scratch",
        "scratch_bytes",
        "staging",
        "used",
    )

    def __init__(self) -> None:
        self.event = cupy.cuda.Event(block=False, disable_timing=True)  # the lane's last copy is done
        self.filled = cupy.cuda.Event(block=False, disable_timing=True)  # bounce: scratch holds a chunk
        self.used = cupy.cuda.Event(block=False, disable_timing=True)  # bounce: scratch may be refilled
        self.params: Any = None  # numpy uint64 view over pinned memory: kernel parameters or table
        self.params_ptr = 0
        self.params_dev_ptr = 0  # the GPU's address of the same pinned memory
        self.dev_params = 0
        self.dev_params_bytes = 0
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
        self.batch = batch_copy()  # the driver's batched copy, None on drivers before CUDA 12.8
        self.slots: list[Slot] = []
        with self.device:
            self.table_kernel, self.blocks_kernel = _compile(config.unroll)
            try:
                for index in range(slots):
                    self.slots.append(Slot(index))
                    for lane in self.slots[-1].lanes:  # parameter buffers now, not inside the first transfers
                        self._params(lane, 1)
            except BaseException:
                self.close()
                raise

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

    # --- copies (each ends by recording the lane's event after its last step) ------------------------------

    def enqueue_blocks(
        self, slot: Slot, lane: Lane, src: GpuSide, s_ids: Any, dst: GpuSide, d_ids: Any, spec: Any
    ) -> None:
        """Method ``kernel``: one launch of ``kvbm_copy_blocks`` for the block pairs (``spec``: the model's shape)."""
        with self.device, _step("copy kernel"):
            words, pieces = _block_params(lane, 0, src, s_ids, dst, d_ids, spec, self.config.piece_bytes, self)
            pointer = self._params_pointer(slot.stream, lane, words)
            self._launch(self.blocks_kernel, slot.stream, pointer, pieces)
            lane.event.record(slot.stream)

    def enqueue_table(self, slot: Slot, lane: Lane, table: RegionTable, deltas: tuple[Any, Any]) -> None:
        """Method ``table``: one launch of ``kvbm_copy`` over every piece of ``table``."""
        with self.device, _step("copy kernel"):
            src, dst = _shifted(table, deltas)
            src, dst, size = split_pieces(src, dst, table.size, self.config.piece_bytes)
            n = int(size.shape[0])
            buf = self._params(lane, 3 * max(n, 1))
            rows = buf[: 3 * n].reshape(n, 3)
            rows[:, 0], rows[:, 1], rows[:, 2] = src, dst, size
            pointer = self._params_pointer(slot.stream, lane, 3 * n)
            self._launch(self.table_kernel, slot.stream, pointer, n)
            lane.event.record(slot.stream)

    def enqueue_memcpy(self, slot: Slot, lane: Lane, dst: Any, src: Any, size: Any) -> None:
        """Method ``memcpy``: runs ``size[i]`` bytes from ``src[i]`` to ``dst[i]`` on the copy engine (host pointers,
        as a layout's addresses are)."""
        with self.device, _step("cudaMemcpyAsync"):
            self._dma(slot.stream, dst, src, size)
            lane.event.record(slot.stream)

    def _dma(self, stream: Any, dst: Any, src: Any, size: Any) -> None:
        """Queue ``size[i]`` bytes from ``src[i]`` to ``dst[i]`` on ``stream``: one batched driver call for two or
        more runs where the driver has it, else a ``cudaMemcpyAsync`` per run. (The device is current.)"""
        runtime = cupy.cuda.runtime
        if self.batch is not None and len(size) > 1:
            runtime.setDevice(self.device_id)  # the driver call needs the context current on this thread
            self.batch(
                np.ascontiguousarray(dst, dtype=np.uint64),
                np.ascontiguousarray(src, dtype=np.uint64),
                np.ascontiguousarray(size, dtype=np.uint64),
                stream.ptr,
            )
            return
        ptr = stream.ptr
        for s, d, n in zip(np.asarray(src).tolist(), np.asarray(dst).tolist(), np.asarray(size).tolist(), strict=True):
            runtime.memcpyAsync(d, s, n, _MEMCPY_DEFAULT, ptr)

    def enqueue_bounce(
        self,
        slot: Slot,
        device: GpuSide,
        device_ids: Any,
        host: GpuSide,
        host_ids: Any,
        spec: Any,
        *,
        offload: bool,
    ) -> None:
        """Method ``bounce`` (``host`` FullyContiguous): chunks of blocks gathered into (or scattered from) GPU
        scratch by the kernel on ``slot.stream`` and moved to (from) the host blocks by DMA on ``slot.dma``, with
        two scratch buffers so that one chunk's kernel overlaps the other's DMA. Events order the two streams on
        the GPU; the CPU queues everything and returns. The slot's first lane's event marks the end."""
        block = spec.num_layers * spec.outer_dim * spec.region_bytes
        per_chunk = max(1, self.config.bounce_bytes // block)
        n = int(device_ids.shape[0])
        starts = list(range(0, n, per_chunk))
        lanes, first = slot.lanes, slot.lanes[0]
        with self.device, _step("bounce copy"):
            need = min(per_chunk, n) * block
            for lane in lanes[: len(starts)]:
                if lane.scratch_bytes < need:
                    self._grow_scratch(lane, need)
            scratch = [
                GpuSide.packed(lane.scratch, spec.region_bytes, spec.num_layers, spec.outer_dim) for lane in lanes
            ]
            # every chunk's kernel parameters, one after another in the first lane's buffer
            words, at, plans = 0, [], []
            for c, start in enumerate(starts):
                ids = device_ids[start : start + per_chunk]
                local = np.arange(ids.shape[0], dtype=np.int64)
                src, s_ids, dst, d_ids = (
                    (device, ids, scratch[c % 2], local) if offload else (scratch[c % 2], local, device, ids)
                )
                used, pieces = _block_params(first, words, src, s_ids, dst, d_ids, spec, self.config.piece_bytes, self)
                at.append(words)
                plans.append(pieces)
                words += used
            base = self._params_pointer(slot.stream, first, words)
            host_base, host_stride = int(host.host_bases[0]), host.block
            kernel_stream, dma_stream = slot.stream, slot.dma
            for c, start in enumerate(starts):
                lane = lanes[c % 2]
                extents = _extents(host_ids[start : start + per_chunk].tolist(), host_base, host_stride, block)
                if offload:
                    if c >= 2:
                        kernel_stream.wait_event(lane.used)  # the DMA of chunk c - 2 has emptied this scratch
                    self._launch(self.blocks_kernel, kernel_stream, base + 8 * at[c], plans[c])
                    lane.filled.record(kernel_stream)
                    dma_stream.wait_event(lane.filled)
                    self._dma(dma_stream, *_runs(extents, lane.scratch, block, to_host=True))
                    lane.used.record(dma_stream)
                else:
                    if c >= 2:
                        dma_stream.wait_event(lane.used)  # the kernel of chunk c - 2 has read this scratch
                    self._dma(dma_stream, *_runs(extents, lane.scratch, block, to_host=False))
                    lane.filled.record(dma_stream)
                    kernel_stream.wait_event(lane.filled)
                    self._launch(self.blocks_kernel, kernel_stream, base + 8 * at[c], plans[c])
                    lane.used.record(kernel_stream)
            if offload:
                first.event.record(dma_stream)
            else:
                first.event.record(kernel_stream)

    def _launch(self, kernel: Any, stream: Any, pointer: int, n: int) -> None:
        if n == 0:
            return
        config = self.config
        grid = n if config.max_grid <= 0 else min(n, config.max_grid)
        kernel((grid,), (config.threads,), (np.uint64(pointer), np.uint32(n)), stream=stream)

    def _params(self, lane: Lane, words: int) -> Any:
        """The lane's pinned parameter buffer, at least ``words`` long (grown while the lane is idle)."""
        if lane.params is None or lane.params.shape[0] < words:
            capacity = max(words, 16384)
            old = lane.params_ptr
            runtime = cupy.cuda.runtime
            ptr = int(runtime.hostAlloc(capacity * 8, _HOST_ALLOC_PORTABLE_MAPPED))
            grown = np.ctypeslib.as_array((_U64 * capacity).from_address(ptr))
            if lane.params is not None:  # keep what was written (bounce writes several chunks' parameters)
                grown[: lane.params.shape[0]] = lane.params
            lane.params_ptr = ptr
            lane.params_dev_ptr = int(runtime.pointerGetAttributes(ptr).devicePointer or ptr)
            lane.params = grown
            if old:
                runtime.freeHost(old)
        return lane.params

    def _params_pointer(self, stream: Any, lane: Lane, words: int) -> int:
        """Where the kernel reads the parameters written so far: mapped pinned memory, or a GPU copy."""
        if not self.config.table_on_device:
            return lane.params_dev_ptr
        nbytes = max(words, 1) * 8
        runtime = cupy.cuda.runtime
        if lane.dev_params_bytes < nbytes:
            if lane.dev_params:
                runtime.free(lane.dev_params)
                lane.dev_params, lane.dev_params_bytes = 0, 0
            lane.dev_params = int(runtime.malloc(max(nbytes, 16384 * 8)))
            lane.dev_params_bytes = max(nbytes, 16384 * 8)
        runtime.memcpyAsync(lane.dev_params, lane.params_ptr, nbytes, _MEMCPY_DEFAULT, stream.ptr)
        return lane.dev_params

    def _grow_scratch(self, lane: Lane, nbytes: int) -> None:
        runtime = cupy.cuda.runtime
        if lane.scratch:
            runtime.free(lane.scratch)
            lane.scratch, lane.scratch_bytes = 0, 0
        lane.scratch = int(runtime.malloc(nbytes))
        lane.scratch_bytes = nbytes

    def wait(self, lane: Lane, step: str) -> None:
        """Block (without the GIL) until the lane's last copy finished; a CUDA error is raised as a StepError."""
        try:
            lane.event.synchronize()  # an event belongs to its context: no need to make the device current
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            self._broken = exc
            raise StepError(step, f"the GPU reported an error while copying: {exc}") from exc

    def synchronize(self, slot: Slot) -> None:
        """Wait for everything on the slot's streams; errors are swallowed (the caller reports its own)."""
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
                    if lane.params_ptr:
                        _quietly(runtime.freeHost, lane.params_ptr)
                        lane.params_ptr, lane.params_dev_ptr, lane.params = 0, 0, None
                    if lane.dev_params:
                        _quietly(runtime.free, lane.dev_params)
                        lane.dev_params, lane.dev_params_bytes = 0, 0
                    if lane.scratch:
                        _quietly(runtime.free, lane.scratch)
                        lane.scratch, lane.scratch_bytes = 0, 0
            self.slots = []
        self._memory.clear()


@contextlib.contextmanager
def _step(step: str) -> Any:
    """CUDA errors while queueing work, as the StepError of ``step``."""
    try:
        yield
    except (cupy.cuda.runtime.CUDARuntimeError, BatchCopyError) as exc:
        raise StepError(step, f"queueing the copy failed: {exc}") from exc


def _runs(extents: list[tuple[int, int, int]], scratch: int, block: int, *, to_host: bool) -> tuple[Any, Any, Any]:
    """(dst, src, size) arrays of the DMA between host extents ``(host address, scratch block, bytes)`` and
    scratch."""
    rows = np.asarray(extents, dtype=np.uint64).reshape(-1, 3)
    host, local = rows[:, 0], np.uint64(scratch) + rows[:, 1] * np.uint64(block)
    return (host, local, rows[:, 2]) if to_host else (local, host, rows[:, 2])


def chunk_shape(src: GpuSide, dst: GpuSide, spec: Any) -> tuple[int, int, int]:
    """(mode, chunks per block, chunk bytes): how much of a block is contiguous on both sides at once.

    Mode 0: each region alone; 1: the outer regions of one layer together; 2: the whole block."""
    r, layers, outer = spec.region_bytes, spec.num_layers, spec.outer_dim
    outer_joins = outer == 1 or (src.outer == r and dst.outer == r)
    layer_joins = outer_joins and (
        layers == 1 or (not src.separate and not dst.separate and src.layer == outer * r and dst.layer == outer * r)
    )
    if layer_joins:
        return 2, 1, layers * outer * r
    if outer_joins:
        return 1, layers, outer * r
    return 0, layers * outer, r


def _block_params(
    lane: Lane,
    at: int,
    src: GpuSide,
    s_ids: Any,
    dst: GpuSide,
    d_ids: Any,
    spec: Any,
    piece: int,
    cuda: CudaContext,
) -> tuple[int, int]:
    """Write kvbm_copy_blocks' parameters at word ``at`` of the lane's buffer: (words used, pieces to copy)."""
    mode, chunks, chunk_bytes = chunk_shape(src, dst, spec)
    pieces_per_chunk = -(-chunk_bytes // piece)
    n = int(s_ids.shape[0])
    ls, ld = int(src.bases.shape[0]), int(dst.bases.shape[0])
    words = _HEADER + ls + ld + 2 * n
    buf = cuda._params(lane, at + words)
    header = [
        n,
        chunks,
        pieces_per_chunk,
        chunk_bytes,
        piece,
        spec.outer_dim,
        mode,
        src.block,
        src.layer,
        src.outer,
        int(src.separate),
        dst.block,
        dst.layer,
        dst.outer,
        int(dst.separate),
        _HEADER,
        _HEADER + ls,
        _HEADER + ls + ld,
        _HEADER + ls + ld + n,
    ]
    buf[at : at + _HEADER] = header
    p = at + _HEADER
    buf[p : p + ls] = src.bases
    buf[p + ls : p + ls + ld] = dst.bases
    buf[p + ls + ld : p + ls + ld + n] = s_ids
    buf[p + ls + ld + n : at + words] = d_ids
    return words, n * chunks * pieces_per_chunk


def _extents(host_ids: list[int], base: int, stride: int, block: int) -> list[tuple[int, int, int]]:
    """(host address, first scratch block, bytes) of the DMA copies for blocks placed 0, 1, ... in scratch:
    neighbouring host blocks with no padding between them go as one copy."""
    out: list[tuple[int, int, int]] = []
    for k, h in enumerate(host_ids):
        addr = base + h * stride
        if out and stride == block and out[-1][0] + out[-1][2] == addr:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + block)
        else:
            out.append((addr, k, block))
    return out


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


_compiled: dict[tuple[int, int], tuple[Any, Any]] = {}
_compile_lock = threading.Lock()


def _compile(unroll: int) -> tuple[Any, Any]:
    """(kvbm_copy, kvbm_copy_blocks) for the current device, compiled once per process (cached on disk by cupy)."""
    key = (cupy.cuda.runtime.getDevice(), unroll)
    with _compile_lock:
        kernels = _compiled.get(key)
        if kernels is None:
            module = cupy.RawModule(code=_KERNEL_SOURCE.read_text(), options=(f"-DKVBM_UNROLL={unroll}",))
            kernels = (module.get_function("kvbm_copy"), module.get_function("kvbm_copy_blocks"))
            _compiled[key] = kernels
        return kernels
