"""Host memory machinery shared by the system and pinned tiers: anonymous mappings, NUMA placement,
parallel page population, progress reporting, and the machine facts error messages quote."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import re
import resource
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from ..config.sizes import align_up, format_bytes
from ..errors import AllocationError
from . import _libc
from ._base import OwnedStorage, numpy_view, torch_from_numpy

log = logging.getLogger("kvbm_builder.storage")

_PCI_BUS_ID = re.compile(r"^([0-9a-fA-F]+):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
_THP_ALIGN = 2 * 2**20


# --- machine facts ------------------------------------------------------------------------------------


def meminfo(key: str) -> int | None:
    """A /proc/meminfo value: bytes for ``kB`` lines (``MemAvailable``), a count otherwise."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == key:
                    parts = rest.split()
                    return int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def mem_available_words() -> str:
    available = meminfo("MemAvailable")
    return "unknown" if available is None else format_bytes(available)


def huge_page_size() -> int:
    return meminfo("Hugepagesize") or 2 * 2**20


def memlock_limit() -> str:
    """The current RLIMIT_MEMLOCK in words, e.g. ``8.0 MiB (ulimit -l 8192)`` or ``unlimited``."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return "unlimited"
    return f"{soft / 2**20:.1f} MiB (ulimit -l {soft // 1024})"


def sysfs_pci_name(bus_id: str) -> str:
    """CUDA's PCI bus id (``00000000:1B:00.0`` or ``0000:1b:00.0``) -> the sysfs name ``0000:1b:00.0``."""
    match = _PCI_BUS_ID.match(bus_id.strip())
    if match is None:
        raise ValueError(f"not a PCI bus id: {bus_id!r}")
    domain, bus, dev, fn = match.groups()
    return f"{int(domain, 16):04x}:{bus.lower()}:{dev.lower()}.{fn}"


def numa_node_count(sysfs: Path = Path("/sys/devices/system/node")) -> int:
    """How many NUMA nodes this machine has (1 when sysfs does not say)."""
    try:
        names = os.listdir(sysfs)
    except OSError:
        return 1
    return max(1, sum(1 for n in names if re.fullmatch(r"node[0-9]+", n)))


def pci_numa_node(pci_name: str, sysfs: Path = Path("/sys/bus/pci/devices")) -> int | None:
    """The NUMA node a PCI device hangs off, or None when the platform does not say (``-1``)."""
    try:
        node = int((sysfs / pci_name / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


# --- mappings -----------------------------------------------------------------------------------------


class HostMapping:
    """An anonymous private mapping: ``length`` bytes (a multiple of ``page_size``) at ``addr``.

    An ``mmap.mmap`` owns it (``memory``; ``addr`` is ``offset`` bytes into it): whatever drops that object unmaps
    the memory, so nothing can leak it, and a numpy view of it keeps it mapped. ``pages`` says what backs it:
    ``"hugetlb"`` (MAP_HUGETLB), ``"thp"`` (MADV_HUGEPAGE accepted) or ``"4k"``.
    """

    __slots__ = ("addr", "length", "memory", "offset", "page_size", "pages")

    def __init__(self, memory: mmap.mmap, base: int, offset: int, length: int, page_size: int, pages: str) -> None:
        self.memory: mmap.mmap | None = memory
        self.offset = offset
        self.addr = base + offset
        self.length = length
        self.page_size = page_size
        self.pages = pages

    @property
    def unmapped(self) -> bool:
        """True once :meth:`unmap` let go of the memory (it may live on in views until they go)."""
        return self.memory is None

    def unmap(self) -> None:
        """munmap now, or, while views still export the memory, leave it to them: the last one unmaps it.
        At most once: a second call never unmaps memory mapped at that address since."""
        memory = self.memory
        if memory is None:
            return
        try:
            _libc.close_mapping(memory)
        except BufferError:
            log.debug("host memory at 0x%x is still used by views: it is unmapped when the last one goes", self.addr)
        self.memory = None


def map_host(size: int, tier: str, *, hugetlb: bool = False, thp: bool = False) -> HostMapping:
    """Map ``size`` bytes (rounded up to whole pages). ``hugetlb``: MAP_HUGETLB from the reserved pool,
    falling back (with a warning saying how to reserve the pool) to transparent huge pages."""
    if hugetlb:
        page = huge_page_size()
        length = align_up(size, page)
        try:
            memory = _libc.map_anonymous(length, hugetlb=True)
        except OSError as exc:
            free = meminfo("HugePages_Free")
            log.warning(
                "%s: huge pages were asked for, but mmap(MAP_HUGETLB) of %s failed (%s): %d pages of %s are "
                "needed and HugePages_Free is %s; reserve them with `sysctl vm.nr_hugepages=%d` (or turn "
                "huge_pages / DYN_KVBM_USE_HUGE_PAGES off). Using transparent huge pages (MADV_HUGEPAGE) instead.",
                tier,
                format_bytes(length),
                exc.strerror,
                length // page,
                format_bytes(page),
                "unknown" if free is None else free,
                length // page,
            )
            thp = True
        else:
            return _owned(memory, lambda base: HostMapping(memory, base, 0, length, page, "hugetlb"))
    length = align_up(size, _libc.PAGE_SIZE)
    # huge pages need 2 MiB aligned ranges: map a little more and use the aligned part (the rest is never touched)
    align = _THP_ALIGN if thp and length >= _THP_ALIGN else _libc.PAGE_SIZE
    try:
        memory = _libc.map_anonymous(length + align - _libc.PAGE_SIZE)
    except OSError as exc:
        raise AllocationError(
            f"{tier}: cannot map {format_bytes(length)} of host memory ({exc.strerror}); MemAvailable is "
            f"{mem_available_words()}: make the tier smaller (num_blocks, DYN_KVBM_CPU_CACHE_GB) or free memory"
        ) from exc

    def aligned(base: int) -> HostMapping:
        start = align_up(base, align)
        pages = "4k"
        if thp:
            try:
                _libc.madvise(start, length, _libc.MADV_HUGEPAGE)
                pages = "thp"
            except OSError as exc:  # THP compiled out or disabled: ordinary pages still work
                log.debug("%s: madvise(MADV_HUGEPAGE) refused (%s); using 4 KiB pages", tier, exc.strerror)
        return HostMapping(memory, base, start - base, length, _libc.PAGE_SIZE, pages)

    return _owned(memory, aligned)


def _owned(memory: mmap.mmap, make: Callable[[int], HostMapping]) -> HostMapping:
    """``make(its address)`` for a fresh mapping; on any failure or interrupt the mapping is unmapped again."""
    try:
        return make(_libc.address_of(memory))
    except BaseException:
        with suppress(BufferError):  # a traceback may still hold an export: then the collector unmaps it
            _libc.close_mapping(memory)
        raise


def place(mapping: HostMapping, node: int, tier: str, *, strict: bool) -> None:
    """Put the mapping's future pages on NUMA ``node``: MPOL_BIND when ``strict``, else MPOL_PREFERRED."""
    try:
        _libc.mbind(mapping.addr, mapping.length, node, _libc.MPOL_BIND if strict else _libc.MPOL_PREFERRED)
    except OSError as exc:
        if strict:
            raise AllocationError(
                f"{tier}: cannot bind host memory to NUMA node {node} (mbind: {exc.strerror}); "
                "turn numa / DYN_KVBM_ENABLE_NUMA off"
            ) from exc
        log.debug("%s: mbind(MPOL_PREFERRED, node %d) failed (%s); default placement", tier, node, exc.strerror)


# --- chunked parallel work ----------------------------------------------------------------------------


def chunks(length: int, chunk: int, align: int) -> list[tuple[int, int]]:
    """``(offset, length)`` pieces covering ``[0, length)``; every piece but the last is ``chunk`` bytes,
    rounded up to ``align``."""
    step = max(align, align_up(chunk, align))
    return [(off, min(step, length - off)) for off in range(0, length, step)]


def run_chunks(
    pieces: Sequence[tuple[int, int]],
    work: Callable[[int, int], None],
    threads: int,
    on_done: Callable[[int], None],
    name: str,
) -> None:
    """Run ``work(offset, length)`` for every piece on up to ``threads`` threads; ``on_done(length)`` is called
    from the calling thread as pieces finish. The first failure (or an exception from ``on_done``) stops the
    workers from taking new pieces and is raised once the running pieces are over.

    Each worker takes the next piece from a shared iterator: the cost per piece is constant, so small pieces
    balance the load well (a future per piece, waited on as a set, costs time in the number of pieces)."""
    if threads <= 1 or len(pieces) <= 1:
        for off, n in pieces:
            work(off, n)
            on_done(n)
        return
    todo = iter(pieces)
    take = threading.Lock()
    stop = threading.Event()
    finished: queue.SimpleQueue[tuple[int, BaseException | None]] = queue.SimpleQueue()

    def worker() -> None:
        while not stop.is_set():
            with take:
                piece = next(todo, None)
            if piece is None:
                return
            try:
                work(*piece)
            except BaseException as exc:
                stop.set()
                finished.put((0, exc))
                return
            finished.put((piece[1], None))

    workers = [
        threading.Thread(target=worker, name=f"{name}-{i}", daemon=True) for i in range(min(threads, len(pieces)))
    ]
    for thread in workers:
        thread.start()
    try:
        for _ in pieces:
            n, exc = finished.get()
            if exc is not None:
                raise exc
            on_done(n)
    finally:
        stop.set()
        for thread in workers:
            thread.join()


class Progress:
    """Throttles ``callback(done, total)``: at most every ``interval`` seconds, and always the final call.

    ``work`` units (bytes populated plus bytes registered, say) are reported as a share of ``total``, so
    ``done`` only grows and the last call has ``done == total``.
    """

    def __init__(
        self, callback: Callable[[int, int], None] | None, total: int, work: int | None = None, interval: float = 0.1
    ) -> None:
        self._callback = callback
        self._total = total
        self._work_total = max(1, total if work is None else work)
        self._interval = interval
        self._work = 0
        self._last = float("-inf")
        self._reported = -1

    def start(self) -> None:
        self._emit(force=True)

    def add(self, units: int) -> None:
        self._work = min(self._work + units, self._work_total)
        self._emit(force=False)

    def finish(self) -> None:
        self._work = self._work_total
        self._emit(force=True)

    def _emit(self, *, force: bool) -> None:
        if self._callback is None:
            return
        now = time.monotonic()
        done = self._work * self._total // self._work_total
        if done == self._reported or (not force and now - self._last < self._interval):
            return
        self._last = now
        self._reported = done
        self._callback(done, self._total)


# --- population ---------------------------------------------------------------------------------------

_RETRY = (errno.EINTR, errno.EAGAIN)


def populate(mapping: HostMapping, tier: str, *, threads: int, chunk_bytes: int, progress: Progress) -> str:
    """Fault every page of the mapping in, on ``threads`` threads. Returns the method used:
    ``"madvise"`` (MADV_POPULATE_WRITE, Linux >= 5.14) or ``"memset"`` (older kernels)."""
    pieces = chunks(mapping.length, chunk_bytes, mapping.page_size)
    method = "madvise"
    first_off, first_len = pieces[0]
    try:
        _populate_madvise(mapping.addr + first_off, first_len)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise _populate_error(tier, mapping, exc) from exc
        log.debug("%s: MADV_POPULATE_WRITE not supported by this kernel; populating with memset", tier)
        method = "memset"
        _libc.memset(mapping.addr + first_off, 0, first_len)
    progress.add(first_len)

    def work(off: int, n: int) -> None:
        if method == "madvise":
            _populate_madvise(mapping.addr + off, n)
        else:
            _libc.memset(mapping.addr + off, 0, n)

    try:
        run_chunks(pieces[1:], work, threads, progress.add, "kvbm-populate")
    except OSError as exc:
        raise _populate_error(tier, mapping, exc) from exc
    return method


def _populate_madvise(addr: int, length: int) -> None:
    for attempt in range(8):
        try:
            _libc.madvise(addr, length, _libc.MADV_POPULATE_WRITE)
            return
        except OSError as exc:
            if exc.errno not in _RETRY or attempt == 7:
                raise


def _populate_error(tier: str, mapping: HostMapping, exc: OSError) -> AllocationError:
    hint = (
        "the huge page pool is too small (HugePages_Free); reserve more with sysctl vm.nr_hugepages"
        if mapping.pages == "hugetlb"
        else f"MemAvailable is {mem_available_words()}; make the tier smaller or free memory"
    )
    return AllocationError(
        f"{tier}: could not populate {format_bytes(mapping.length)} of host memory "
        f"(madvise(MADV_POPULATE_WRITE): {exc.strerror}); {hint}"
    )


# --- storages -----------------------------------------------------------------------------------------


class HostStorage(OwnedStorage):
    """Host memory at a fixed address, viewable from numpy and torch without copying."""

    def __init__(self, mapping: HostMapping | None, addr: int, size: int) -> None:
        super().__init__(addr, size, 0)
        self._mapping = mapping

    @property
    def pages(self) -> str:
        """What backs the memory: ``"hugetlb"``, ``"thp"``, ``"4k"`` or ``"cuda"`` (cudaHostAlloc)."""
        return self._mapping.pages if self._mapping is not None else "cuda"

    def as_numpy(self) -> Any:
        """A zero-copy ``numpy.uint8`` array of ``size`` bytes. It keeps the memory alive: after ``close()`` it
        still works, and the memory is released when the last such view is gone."""
        with self._state:
            self._check_open("make a numpy view")
            memory, offset = self._exported()
            return numpy_view(memory, offset, self._size, self)

    def as_torch(self) -> Any:
        """A zero-copy CPU ``torch.uint8`` tensor of ``size`` bytes; like :meth:`as_numpy`, it keeps the memory."""
        return torch_from_numpy(self.as_numpy())

    def _exported(self) -> tuple[object, int]:
        """An object that owns the memory and exports it as a buffer, and where ``addr`` is in it."""
        assert self._mapping is not None and self._mapping.memory is not None
        return self._mapping.memory, self._mapping.offset

    def _repr_extra(self) -> str:
        return f", {self.pages} pages"


# --- machine facts, as numbers ------------------------------------------------------------------------


def memlock_bytes() -> int | None:
    """The current soft RLIMIT_MEMLOCK in bytes (what :func:`memlock_limit` says in words); None when unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft
