"""The CPU side of transfers: copies between host layouts, and positional I/O between host memory and disk.

Everything here works on a :class:`RegionTable` and splits it into *operations* that worker threads run in
parallel: a group of ``memmove`` calls (host to host), or one ``preadv`` / ``pwritev`` over a stretch of the file
that the runs cover without a gap (host to and from disk; the memory side may be scattered, it becomes the I/O
vector). ``memmove`` through ctypes and ``os.preadv`` / ``os.pwritev`` release the GIL, so the threads overlap.

O_DIRECT: an operation whose file offset, length and every memory piece are 4096-aligned goes straight between
the file and the caller's memory. Any other goes through the disk storage's own ``read_into`` / ``write``, which
bounce unaligned edges through an aligned buffer (read-modify-write of partly covered blocks under the storage's
lock), so it stays right when two transfers share a 4096-byte block of the file.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, wait

from ..config.protocols import Storage
from ..layout import Layout
from ..storage.disk import ALIGNMENT
from ._table import RegionTable

__all__ = ["IoOp", "StepError", "host_copy_ops", "io_ops", "run_ops"]

#: The most bytes one I/O operation moves: large enough for full-speed I/O, small enough to spread over threads.
MAX_OP_BYTES = 16 * 2**20
#: The most bytes one memmove operation moves: a staging chunk spreads over several threads.
MAX_COPY_BYTES = 2 * 2**20
#: The most memory pieces one preadv/pwritev takes (IOV_MAX on Linux).
IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)

#: Stop check: None to go on, else the reason to stop (``cancelled`` or ``closed``).
StopCheck = Callable[[], "str | None"]


class StepError(Exception):
    """What a worker reports when one step of a batch fails: the step's name, and the cause in words."""

    def __init__(self, step: str, message: str) -> None:
        self.step = step
        super().__init__(message)


def memory(addr: int, size: int) -> memoryview:
    """A writable byte view of ``size`` bytes of host memory at ``addr`` (no copy; the caller keeps it alive)."""
    return memoryview((ctypes.c_char * size).from_address(addr)).cast("B")


class HostMemory:
    """Byte views of a host layout's storages, so that a run becomes a slice (cheaper than a ctypes array each)."""

    __slots__ = ("addrs", "views")

    def __init__(self, layout: Layout) -> None:
        self.addrs = [s.addr for s in layout.storages]
        self.views = [memory(s.addr, s.size) for s in layout.storages]

    def slice(self, storage: int, addr: int, size: int) -> memoryview:
        start = addr - self.addrs[storage]
        return self.views[storage][start : start + size]

    def release(self) -> None:
        for view in self.views:
            view.release()
        self.views = []


class IoOp:
    """One operation: ``run()`` does it on a worker thread; ``nbytes`` is what it moves."""

    __slots__ = ("nbytes", "run")

    def __init__(self, nbytes: int, run: Callable[[], None]) -> None:
        self.nbytes, self.run = nbytes, run


def run_ops(ops: Sequence[IoOp], pool: Executor | None, stop: StopCheck) -> None:
    """Run ``ops`` (on ``pool`` when there are several), stopping at the first failure or stop request.

    Operations not yet started when one fails, or when ``stop()`` gives a reason, are not started; the first
    error is raised once every started operation has returned (so none is still writing afterwards)."""
    if not ops:
        return
    failed: list[BaseException] = []

    def guarded(op: IoOp) -> None:
        if failed:
            raise _Skipped
        reason = stop()
        if reason is not None:
            error = StepError(reason, f"the transfer was {reason} before it finished")
            failed.append(error)
            raise error
        try:
            op.run()
        except BaseException as exc:
            failed.append(exc)
            raise

    if pool is None or len(ops) == 1:
        for op in ops:
            guarded(op)
        return
    futures: list[Future[None]] = [pool.submit(guarded, op) for op in ops]
    wait(futures, return_when=FIRST_EXCEPTION)
    wait(futures)  # every started operation has returned
    if failed:
        raise failed[0]


class _Skipped(Exception):
    """An operation not started because another one of its batch failed."""


# --- host to host -------------------------------------------------------------------------------------------


def host_copy_ops(table: RegionTable) -> list[IoOp]:
    """memmove operations of about ``MAX_COPY_BYTES`` each (a long run is split)."""
    src, dst, size = table.src.tolist(), table.dst.tolist(), table.size.tolist()
    ops: list[IoOp] = []
    group: list[tuple[int, int, int]] = []
    bytes_in_group = 0
    for s, d, n in zip(src, dst, size, strict=True):
        for start in range(0, n, MAX_COPY_BYTES):
            piece = min(MAX_COPY_BYTES, n - start)
            group.append((d + start, s + start, piece))
            bytes_in_group += piece
            if bytes_in_group >= MAX_COPY_BYTES:
                ops.append(IoOp(bytes_in_group, _memmoves(group)))
                group, bytes_in_group = [], 0
    if group:
        ops.append(IoOp(bytes_in_group, _memmoves(group)))
    return ops


def _memmoves(group: list[tuple[int, int, int]]) -> Callable[[], None]:
    def run() -> None:
        for d, s, n in group:
            ctypes.memmove(d, s, n)

    return run


# --- host and disk ------------------------------------------------------------------------------------------


def io_ops(
    table: RegionTable,
    host: HostMemory,
    disk: Layout,
    fds: Sequence[int],
    *,
    to_disk: bool,
) -> list[IoOp]:
    """preadv / pwritev operations for the runs of ``table`` (host side ``host``, disk side ``disk``).

    Runs are taken in file order; neighbours in the file join one operation (up to ``MAX_OP_BYTES`` and
    ``IOV_MAX`` pieces), whatever their places in memory. ``fds`` are the descriptors to use, one per disk storage.
    """
    import numpy as np

    if to_disk:
        mem_addr, mem_storage, file_off, file_storage = table.src, table.src_storage, table.dst, table.dst_storage
    else:
        mem_addr, mem_storage, file_off, file_storage = table.dst, table.dst_storage, table.src, table.src_storage
    order = np.lexsort((file_off, file_storage))
    addrs, mstores = mem_addr[order].tolist(), mem_storage[order].tolist()
    offsets, fstores, sizes = file_off[order].tolist(), file_storage[order].tolist(), table.size[order].tolist()

    ops: list[IoOp] = []
    pieces: list[tuple[int, int, int]] = []  # (memory storage, address, bytes) of the operation being built
    op_storage, op_start, op_end = -1, 0, 0
    for addr, mstore, offset, fstore, n in zip(addrs, mstores, offsets, fstores, sizes, strict=True):
        done = 0
        while done < n:
            if (
                fstore != op_storage
                or offset + done != op_end
                or op_end - op_start >= MAX_OP_BYTES
                or (len(pieces) >= IOV_MAX)
            ):
                if pieces:
                    ops.append(_io_op(host, disk, fds, op_storage, op_start, pieces, to_disk))
                pieces, op_storage, op_start, op_end = [], fstore, offset + done, offset + done
            take = min(n - done, MAX_OP_BYTES - (op_end - op_start))
            pieces.append((mstore, addr + done, take))
            op_end += take
            done += take
    if pieces:
        ops.append(_io_op(host, disk, fds, op_storage, op_start, pieces, to_disk))
    return ops


def _io_op(
    host: HostMemory,
    disk: Layout,
    fds: Sequence[int],
    storage_index: int,
    offset: int,
    pieces: list[tuple[int, int, int]],
    to_disk: bool,
) -> IoOp:
    storage = disk.storages[storage_index]
    fd = fds[storage_index]
    views = [host.slice(mstore, addr, n) for mstore, addr, n in pieces]
    total = sum(n for _, _, n in pieces)
    direct = not getattr(storage, "o_direct", False) or (
        offset % ALIGNMENT == 0 and all(addr % ALIGNMENT == 0 and n % ALIGNMENT == 0 for _, addr, n in pieces)
    )
    path = getattr(storage, "path", f"disk storage {storage_index}")

    if direct and to_disk:

        def run() -> None:
            _pwritev_all(fd, views, offset, path)

    elif direct:

        def run() -> None:
            _preadv_all(fd, views, offset, path)

    elif to_disk:

        def run() -> None:
            bounce = bytearray(total)
            at = 0
            for view in views:
                bounce[at : at + len(view)] = view
                at += len(view)
            _through_storage(storage, "write disk", lambda: storage.write(offset, bounce))  # type: ignore[attr-defined]

    else:

        def run() -> None:
            bounce = bytearray(total)
            _through_storage(storage, "read disk", lambda: storage.read_into(offset, bounce))  # type: ignore[attr-defined]
            at = 0
            for view in views:
                view[:] = bounce[at : at + len(view)]
                at += len(view)

    return IoOp(total, run)


def _through_storage(storage: Storage, step: str, call: Callable[[], None]) -> None:
    try:
        call()
    except Exception as exc:  # DiskStorageError, StorageClosedError, LayoutError: their words name the file
        raise StepError(step, str(exc)) from exc


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def _preadv_all(fd: int, views: list[memoryview], offset: int, path: str) -> None:
    done = 0
    while views:
        try:
            n = os.preadv(fd, views, offset + done)
        except OSError as exc:
            raise _os_error("read disk", exc, path, offset + done) from exc
        if n <= 0:
            want = sum(len(v) for v in views)
            raise StepError(
                "read disk",
                f"short read from {path}: end of file at offset {offset + done} with {want} bytes still to read "
                "(the file is shorter than its layout: was it truncated or replaced?)",
            )
        done += n
        views = _advance(views, n)


def _pwritev_all(fd: int, views: list[memoryview], offset: int, path: str) -> None:
    done = 0
    while views:
        try:
            n = os.pwritev(fd, views, offset + done)
        except OSError as exc:
            raise _os_error("write disk", exc, path, offset + done) from exc
        if n <= 0:
            raise StepError("write disk", f"short write to {path} at offset {offset + done}: nothing was written")
        done += n
        views = _advance(views, n)


def _os_error(step: str, exc: OSError, path: str, offset: int) -> StepError:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    hint = ""
    if exc.errno == errno.EBADF:
        hint = "; the file descriptor is not open (was the disk storage closed, or its fd closed by someone else?)"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; the file system is full: free space, or move DYN_KVBM_DISK_CACHE_DIR to one with room"
    elif exc.errno == errno.EINVAL:
        hint = "; the file system refused the O_DIRECT request: set DYN_KVBM_DISK_DISABLE_O_DIRECT=1"
    return StepError(step, f"{step} failed on {path} at offset {offset}: {exc.strerror} ({code}){hint}")
