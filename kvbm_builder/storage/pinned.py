"""G2: page-locked host memory that the GPU copies to and from at full speed.

Mode ``register`` (the default) is the fast path for large tiers:

1. one anonymous mmap (MAP_HUGETLB when ``huge_pages``; otherwise 4 KiB pages with MADV_HUGEPAGE, so
   the kernel backs it with transparent huge pages where it can),
2. NUMA placement on the GPU's node when the machine has several (mbind; MPOL_BIND when ``numa``,
   else MPOL_PREFERRED),
3. every page faulted in by ``threads`` threads (madvise MADV_POPULATE_WRITE per chunk; memset on
   kernels older than 5.14), through ctypes calls that release the GIL,
4. one ``cudaHostRegister(..., cudaHostRegisterPortable)`` over the whole range. With the pages already
   in memory it is quick (about 0.4 s for 16 GiB on an H200). Never in chunks: CUDA refuses a copy spanning
   two separately registered ranges (cudaErrorInvalidValue), and a block may straddle any boundary.

Mode ``host_alloc`` is upstream's ``cudaHostAlloc``: simple, but slow for tens of GiB. Neither mode uses
a caching pinned pool (cupy's and torch's round sizes up to a power of two: 33 GiB would become 64 GiB).

Every resource has an owner from the moment it exists (the mapping an ``mmap.mmap``, cudaHostAlloc memory cupy's
``PinnedMemory``), and a registration is undone on any failure or interrupt, even one raised as
``cudaHostRegister`` returns; numpy views keep the memory (not the registration) after ``close()``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs

from ..config.allocators import PinnedAllocator, PinningMode
from ..config.fields import Validated, field, integer, true_or_false
from ..config.protocols import StorageKind
from ..config.sizes import format_bytes
from ..errors import AllocationError
from . import _cuda, _host, _libc
from ._base import check_size

log = logging.getLogger("kvbm_builder.storage")

_TIER = StorageKind.PINNED.tier.words
_NO_CUDA_HINT = (
    "Pinned memory needs CUDA; without a GPU use the system allocator for the host tier: SystemAllocator() "
    '(in a config file: {"kind": "system"})'
)
MiB = 2**20


def default_threads() -> int:
    """Threads that populate pages when ``PinnedAllocator.threads`` is not set: the usable CPUs, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


@attrs.frozen(kw_only=True)
class PinTuning(Validated):
    """How the pinned tier does its work; the defaults are what ``benchmarks/bench_pinned.py`` found fastest.

    ``populate_chunk_bytes``: the piece of the range one thread faults in at a time (register mode).
    ``transparent_huge_pages``: madvise(MADV_HUGEPAGE) on the mapping, so it is populated and pinned in 2 MiB pages.
    ``write_combined``: cudaHostAllocWriteCombined in host_alloc mode (fast host-to-device, very slow CPU reads).
    """

    _kvbm_root: ClassVar[str] = "tuning"

    populate_chunk_bytes: int = field(
        default=16 * MiB, rule=integer(min=4096), doc="Bytes one thread populates at a time."
    )
    transparent_huge_pages: bool = field(default=True, rule=true_or_false, doc="madvise(MADV_HUGEPAGE) the mapping.")
    write_combined: bool = field(default=False, rule=true_or_false, doc="cudaHostAllocWriteCombined (host_alloc).")


class PinnedStorage(_host.HostStorage):
    """Page-locked host memory. ``device_id`` is 0 (NIXL's devId for host memory); ``gpu`` is the GPU
    whose NUMA node it was placed on and whose context registered it (portable: every GPU can use it)."""

    kind: ClassVar[StorageKind] = StorageKind.PINNED

    def __init__(
        self,
        mapping: _host.HostMapping | None,
        addr: int,
        size: int,
        *,
        gpu: int,
        mode: PinningMode,
        registered: tuple[int, ...] = (),
        numa_node: int | None = None,
        populate_method: str | None = None,
        phase_seconds: Mapping[str, float] | None = None,
        host_memory: Any = None,
    ) -> None:
        super().__init__(mapping, addr, size)
        self._host_memory = host_memory  # host_alloc mode: cupy's PinnedMemory, which cudaFreeHosts when dropped
        self._gpu = gpu
        self._mode = mode
        self._registered = registered
        self._numa_node = numa_node
        self._populate_method = populate_method
        self._phase_seconds = dict(phase_seconds or {})
        self._freed = False  # cudaFreeHost (host_alloc) or cudaHostUnregister (register) went through
        self._unregister_tried = False  # a close() reached cudaHostUnregister (it may have been interrupted)

    @property
    def gpu(self) -> int:
        return self._gpu

    @property
    def mode(self) -> PinningMode:
        return self._mode

    @property
    def registrations(self) -> int:
        """How many cudaHostRegister ranges pin the memory (0 in host_alloc mode)."""
        return len(self._registered)

    @property
    def numa_node(self) -> int | None:
        """The NUMA node the pages were placed on, or None when left to the kernel."""
        return self._numa_node

    @property
    def populate_method(self) -> str | None:
        """``"madvise"`` or ``"memset"`` (register mode), None in host_alloc mode."""
        return self._populate_method

    @property
    def phase_seconds(self) -> dict[str, float]:
        """Wall time of each bring-up step (``map``, ``populate``, ``register`` or ``host_alloc``)."""
        return dict(self._phase_seconds)

    def _release(self) -> None:
        import cupy

        if self._mapping is None:
            # cupy's PinnedMemory calls cudaFreeHost once the last reference goes: ours now, or the last view's
            with cupy.cuda.Device(self._gpu):
                self._host_memory = None
            return
        if not self._freed:
            # Our mapping still covers the range, so no other registration can: after an interrupted close() ask
            # CUDA whether the call got through, and unregister what it still holds (never twice, never leaving a
            # registration behind an unmapped range, which would make CUDA refuse the next mapping there).
            ptrs = self._registered
            if self._unregister_tried:
                ptrs = tuple(ptr for ptr in ptrs if _cuda.is_registered_host(ptr))
            self._unregister_tried = True
            _unregister(cupy, self._gpu, ptrs)  # a failure is logged: CUDA offers no way to retry it
            self._freed = True
        self._mapping.unmap()

    def _exported(self) -> tuple[object, int]:
        if self._mapping is not None:
            return super()._exported()
        import cupy

        return cupy.cuda.PinnedMemoryPointer(self._host_memory, 0), 0

    def _repr_extra(self) -> str:
        return f", {self.pages} pages, {self._mode.value}"


def allocate_pinned(size: int, spec: PinnedAllocator, *, tuning: PinTuning | None = None) -> PinnedStorage:
    """``size`` bytes of pinned host memory as ``spec`` says. ``spec.progress(done, total)`` is called from
    this thread while it works (throttled; the last call has ``done == total``); an exception it raises
    aborts the allocation. On any failure everything done so far is undone before the error propagates."""
    check_size(size, StorageKind.PINNED)
    tuning = tuning or PinTuning()
    cupy = _cuda.require_cuda(_TIER, spec.device_id, _NO_CUDA_HINT)
    if spec.mode is PinningMode.host_alloc:
        return _host_alloc(cupy, size, spec, tuning)
    return _map_and_register(cupy, size, spec, tuning)


def _host_alloc(cupy: Any, size: int, spec: PinnedAllocator, tuning: PinTuning) -> PinnedStorage:
    if spec.numa:
        log.warning("%s: numa placement needs mode 'register'; cudaHostAlloc memory is placed by the driver", _TIER)
    progress = _host.Progress(spec.progress, size)
    progress.start()
    flags = _cuda.HOST_ALLOC_PORTABLE | (_cuda.HOST_ALLOC_WRITE_COMBINED if tuning.write_combined else 0)
    start = time.perf_counter()
    memory: Any = None
    try:
        with cupy.cuda.Device(spec.device_id):
            try:
                # owned from the start: dropped on any failure or interrupt, it frees itself (cudaFreeHost)
                memory = cupy.cuda.PinnedMemory(size, flags)
            except cupy.cuda.runtime.CUDARuntimeError as exc:
                raise _pin_error("cudaHostAlloc", size, exc) from exc
        seconds = {"host_alloc": time.perf_counter() - start}
        progress.finish()
        return PinnedStorage(
            None, int(memory.ptr), size, gpu=spec.device_id, mode=spec.mode, phase_seconds=seconds, host_memory=memory
        )
    finally:
        with cupy.cuda.Device(spec.device_id):
            memory = None  # the storage holds it now; after a failure nothing does, and it is freed here


@attrs.frozen
class _Mapped:
    """Host memory mapped, placed and populated: what register mode hands to cudaHostRegister."""

    mapping: _host.HostMapping
    node: int | None
    method: str
    progress: _host.Progress
    seconds: dict[str, float]


def _map_and_populate(size: int, spec: PinnedAllocator, tuning: PinTuning) -> _Mapped:
    """Steps 1 to 3 of register mode (no CUDA involved); on any failure or interrupt the mapping is unmapped."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    mapping = _host.map_host(size, _TIER, hugetlb=spec.huge_pages, thp=tuning.transparent_huge_pages)
    try:
        node = _numa_node(spec)
        if node is not None:
            _host.place(mapping, node, _TIER, strict=spec.numa)
        seconds["map"] = time.perf_counter() - start
        progress = _host.Progress(spec.progress, size, work=2 * mapping.length)
        progress.start()

        start = time.perf_counter()
        threads = spec.threads or default_threads()
        method = _host.populate(
            mapping, _TIER, threads=threads, chunk_bytes=tuning.populate_chunk_bytes, progress=progress
        )
        seconds["populate"] = time.perf_counter() - start
        return _Mapped(mapping, node, method, progress, seconds)
    except BaseException:
        mapping.unmap()
        raise


def _map_and_register(cupy: Any, size: int, spec: PinnedAllocator, tuning: PinTuning) -> PinnedStorage:
    runtime = cupy.cuda.runtime
    mapped = _map_and_populate(size, spec, tuning)
    mapping, seconds = mapped.mapping, mapped.seconds
    pinned = False  # whether CUDA may hold the range
    storage: PinnedStorage | None = None
    try:
        start = time.perf_counter()
        pinned = True  # set before the call: an interrupt raised as it returns must not leave the range pinned
        try:
            with cupy.cuda.Device(spec.device_id):
                runtime.hostRegister(mapping.addr, mapping.length, _cuda.HOST_REGISTER_PORTABLE)
        except runtime.CUDARuntimeError as exc:
            pinned = False  # CUDA said no: nothing to undo
            raise _pin_error("cudaHostRegister", mapping.length, exc) from exc
        mapped.progress.add(mapping.length)
        seconds["register"] = time.perf_counter() - start
        mapped.progress.finish()
        storage = PinnedStorage(
            mapping,
            mapping.addr,
            size,
            gpu=spec.device_id,
            mode=spec.mode,
            registered=(mapping.addr,),
            numa_node=mapped.node,
            populate_method=mapped.method,
            phase_seconds=seconds,
        )
    except BaseException:
        if storage is not None:
            storage.close()
        elif not mapping.unmapped:  # else a storage made and dropped at once has released everything itself
            if pinned:
                _unregister(cupy, spec.device_id, [mapping.addr], maybe=True)
            mapping.unmap()
        raise
    return storage


def _numa_node(spec: PinnedAllocator) -> int | None:
    """The GPU's NUMA node when placing there means something (several nodes), else None."""
    if _host.numa_node_count() <= 1:
        return None
    if not _libc.mbind_supported():
        if spec.numa:
            log.warning("%s: NUMA placement is not supported on this CPU architecture; skipped", _TIER)
        return None
    node = _cuda.gpu_numa_node(spec.device_id)
    if node is None and spec.numa:
        log.warning("%s: the NUMA node of GPU %d is unknown (sysfs numa_node is -1); skipped", _TIER, spec.device_id)
    return node


def _unregister(cupy: Any, gpu: int, ptrs: Sequence[int], *, maybe: bool = False) -> None:
    """cudaHostUnregister each range (newest first). ``maybe``: the registration may never have happened (an
    interrupt hit cudaHostRegister), so CUDA saying it is not registered is the expected answer, not a failure."""
    for ptr in reversed(ptrs):
        try:
            with cupy.cuda.Device(gpu):
                cupy.cuda.runtime.hostUnregister(ptr)
        except Exception as exc:
            if maybe and _cuda.cuda_error_code(exc) == _cuda.ERROR_HOST_MEMORY_NOT_REGISTERED:
                continue
            log.warning("%s: cudaHostUnregister(0x%x) failed: %s", _TIER, ptr, str(exc))


def _pin_error(call: str, size: int, exc: Exception) -> AllocationError:
    return AllocationError(
        f"{_TIER}: {call} of {format_bytes(size)} failed: {exc}. RLIMIT_MEMLOCK is "
        f"{_host.memlock_limit()}: raise it (`ulimit -l unlimited`; in a container `--ulimit memlock=-1`); "
        f"MemAvailable is {_host.mem_available_words()}: a smaller tier (num_blocks, DYN_KVBM_CPU_CACHE_GB) may fit"
    )
