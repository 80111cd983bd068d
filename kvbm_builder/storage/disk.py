"""G3: one file per storage, created in the disk allocator's directory (``DYN_KVBM_DISK_CACHE_DIR``).

The file is ``kvbm-g3-<pid>-<random>.bin``, created with O_CREAT | O_EXCL and mode 0600 under the absolute form of the
directory (resolved when the file is made, so a later ``os.chdir()`` cannot make ``close()`` remove another file),
switched to O_DIRECT unless ``o_direct`` is off (``DYN_KVBM_DISK_DISABLE_O_DIRECT``), its space reserved with
fallocate(2). When the file system refuses fallocate, the file is zero-filled (``DYN_KVBM_DISK_ZEROFILL_FALLBACK``) or
truncated to size with a :class:`DiskReservationWarning`. ``close()`` closes and removes the file; so does any
failure or interrupt while it is being made (its descriptor is owned by an ``io.FileIO`` from the moment it exists).
``close()`` waits for reads and writes in flight, so none of them can reach a descriptor number reused by another
file. Every error says which step failed and which variable changes it.

A region's "address" is its offset in the file (``addr`` is 0) and NIXL's devId is the file descriptor.
"""

from __future__ import annotations

import errno
import io
import mmap
import operator
import os
import re
import secrets
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import ClassVar

from ..config.allocators import DiskAllocator
from ..config.env import DYN_KVBM_DISK_CACHE_DIR
from ..config.protocols import StorageKind
from ..config.sizes import MAX_BYTES, align_up, format_bytes
from ..errors import DiskReservationWarning, DiskStorageError, LayoutError, StorageBufferError
from . import _libc
from ._base import OwnedStorage, add_note, check_size, log

_TIER = StorageKind.DISK.tier.words
#: O_DIRECT needs buffer address, file offset and length aligned to the logical block size; 4096 covers all.
ALIGNMENT = 4096
_BOUNCE = 8 * 2**20
_DIR_VAR = DYN_KVBM_DISK_CACHE_DIR
_NO_O_DIRECT = "set DYN_KVBM_DISK_DISABLE_O_DIRECT=1 (o_direct=false)"
#: Buffer formats (PEP 3118) of plain numbers and bytes: what a file can hold and give back bit for bit.
_PLAIN = re.compile(r"[@=<>!]?(?:[bBhHiIlLqQnNefdc]|Z[fdg])")


class DiskStorage(OwnedStorage):
    """A file holding ``size`` bytes of the disk tier, open read/write as ``fd``."""

    kind: ClassVar[StorageKind] = StorageKind.DISK

    def __init__(self, path: str, file: io.FileIO, size: int, *, o_direct: bool, reserved: str) -> None:
        super().__init__(0, size, file.fileno())
        self._path = path
        self._file = file  # owns the descriptor: closing it closes the descriptor exactly once
        self._fd = file.fileno()
        self._o_direct = o_direct
        self._reserved = reserved
        # O_DIRECT read-modify-write of a partly covered 4096-byte block: two writers of disjoint ranges that
        # share the block would each write back the other's old bytes
        self._rmw_lock = threading.Lock()

    @property
    def path(self) -> str:
        """The file's absolute path."""
        return self._path

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def o_direct(self) -> bool:
        return self._o_direct

    @property
    def reserved(self) -> str:
        """How the space was reserved: ``"fallocate"``, ``"zerofill"`` or ``"truncate"`` (not reserved)."""
        return self._reserved

    def write(self, offset: int, data: object) -> None:
        """Write the bytes of ``data`` (any contiguous buffer) at file offset ``offset``.

        Works under O_DIRECT whatever the alignment: unaligned pieces go through an aligned bounce buffer
        (read-modify-write of the partly covered 4096-byte blocks). ``data`` holds plain numbers or bytes: object,
        structured, string and datetime arrays are refused (StorageBufferError)."""
        offset = _offset(offset, "write")
        view = _bytes_of(data, "write()", writable=False)
        self._check_range(offset, len(view), "write")
        with self.in_use("write"), self._io("write"):
            if not self._o_direct or _aligned(view, offset):
                _pwrite_all(self._fd, view, offset)
            else:
                self._bounced(offset, view, write=True)

    def read_into(self, offset: int, buf: object) -> None:
        """Fill the writable buffer ``buf`` (of plain numbers or bytes, like :meth:`write`'s) with the bytes at file
        offset ``offset``."""
        offset = _offset(offset, "read")
        view = _bytes_of(buf, "read_into()", writable=True)
        self._check_range(offset, len(view), "read")
        with self.in_use("read"), self._io("read"):
            if not self._o_direct or _aligned(view, offset):
                _pread_all(self._fd, view, offset)
            else:
                self._bounced(offset, view, write=False)

    def _bounced(self, offset: int, view: memoryview, *, write: bool) -> None:
        end = offset + len(view)
        start = offset - offset % ALIGNMENT
        with _aligned_buffer(_BOUNCE) as bounce:
            window = start
            while window < end:
                span = min(_BOUNCE, align_up(end, ALIGNMENT) - window)
                lo, hi = max(offset, window), min(end, window + span)
                part = memoryview(bounce)[:span]
                try:
                    if not write:
                        _pread_all(self._fd, part, window)
                        view[lo - offset : hi - offset] = part[lo - window : hi - window]
                    elif lo > window or hi < window + span:  # partly covered: keep what is there
                        with self._rmw_lock:
                            _pread_all(self._fd, part, window)
                            part[lo - window : hi - window] = view[lo - offset : hi - offset]
                            _pwrite_all(self._fd, part, window)
                    else:
                        part[:] = view[lo - offset : hi - offset]
                        _pwrite_all(self._fd, part, window)
                finally:
                    part.release()
                window += span

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or offset + length > self._size:
            raise LayoutError(
                f"{_TIER}: cannot {what} [{offset}, {offset + length}) in {self._path}: "
                f"the storage holds {self._size} bytes"
            )

    @contextmanager
    def _io(self, step: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) and self._reserved == "truncate":
                hint = (
                    "the space was never reserved (fallocate unsupported): set DYN_KVBM_DISK_ZEROFILL_FALLBACK=1 "
                    f"to reserve it up front, or move {_DIR_VAR} to a file system with room"
                )
            elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
                hint = f"the file system is full; free space, or move {_DIR_VAR} to a file system with room"
            elif exc.errno == errno.EINVAL and self._o_direct:
                hint = f"the file system ({self._fs()}) refused an O_DIRECT {step}; {_NO_O_DIRECT}"
            else:
                hint = f"check the file system ({self._fs()}), or choose another {_DIR_VAR}"
            raise DiskStorageError(
                f"{_TIER}: {step} failed on {self._path}: {exc.strerror} ({_code(exc)}); {hint}"
            ) from exc

    def _release(self) -> None:
        try:
            # at most once, even when it fails (Linux frees the descriptor anyway): a retry never closes a
            # descriptor number that was handed out again
            _libc.close_file(self._file)
        except OSError as exc:
            log.warning("%s: closing %s failed (%s); removing it anyway", _TIER, self._path, exc.strerror)
        try:
            _remove(self._path)
        except OSError as exc:
            raise DiskStorageError(
                f"{_TIER}: cannot remove {self._path} (step: close): {exc.strerror} ({_code(exc)}); "
                "the storage stays open: call close() again once the file can be removed"
            ) from exc

    def _fs(self) -> str:
        return fs_type(os.path.dirname(self._path))

    def _repr_extra(self) -> str:
        return f", {self._path}"


def allocate_disk(size: int, spec: DiskAllocator) -> DiskStorage:
    """A new file of ``size`` bytes in ``spec.directory``; closed and removed again on any failure or interrupt."""
    # the file is a whole number of 4096-byte blocks, and its size must fit fallocate's signed 64-bit length
    check_size(size, StorageKind.DISK, limit=MAX_BYTES - ALIGNMENT + 1)
    directory = _absolute(spec.directory)
    _check_directory(directory)
    path = os.path.join(directory, f"kvbm-g3-{os.getpid()}-{secrets.token_hex(6)}.bin")
    try:
        file = _libc.open_new_file(path)
    except FileExistsError as exc:  # never remove a file that is not ours
        raise _open_error(path, directory, exc, spec.o_direct) from exc
    except OSError as exc:
        _remove(path)
        raise _open_error(path, directory, exc, spec.o_direct) from exc
    except BaseException:  # an interrupt: the file may exist (its descriptor went with the dropped FileIO)
        _remove(path)
        raise
    storage: DiskStorage | None = None
    try:
        if spec.o_direct:
            try:
                _libc.set_o_direct(file.fileno())
            except OSError as exc:
                raise _open_error(path, directory, exc, o_direct=True) from exc
        file_size = align_up(size, ALIGNMENT)  # O_DIRECT reads and writes whole blocks, up to the last one
        reserved = _reserve(file.fileno(), path, directory, file_size, spec)
        storage = DiskStorage(path, file, size, o_direct=spec.o_direct, reserved=reserved)
    except BaseException as failure:
        if storage is not None:
            _undo(failure, storage.close)
        elif not file.closed:  # else a storage made and dropped at once has released everything itself
            _undo(failure, lambda: _libc.close_file(file), lambda: _remove(path))
        raise
    return storage


def _undo(failure: BaseException, *steps: Callable[[], None]) -> None:
    """Run every cleanup step; what fails is added to ``failure`` as a note (the failure stays the news)."""
    for step in steps:
        try:
            step()
        except Exception as exc:
            add_note(failure, f"while cleaning up: {type(exc).__name__}: {exc}")


def _absolute(directory: str) -> str:
    """``directory`` made absolute now, so that a later os.chdir() changes nothing."""
    try:
        return os.path.abspath(directory)
    except OSError as exc:  # a relative directory, and the working directory was removed
        raise DiskStorageError(
            f"{_TIER}: cannot resolve the relative directory {directory!r} (step: open): the current working "
            f"directory is gone ({exc.strerror}); point {_DIR_VAR} (the disk allocator's directory) at an "
            "absolute path"
        ) from exc


def _check_directory(directory: str) -> None:
    try:
        is_dir = os.path.isdir(directory)
        exists = is_dir or os.path.lexists(directory)
    except OSError:  # pragma: no cover - isdir swallows almost everything
        is_dir, exists = False, False
    if not exists:
        raise DiskStorageError(
            f"{_TIER}: the directory {directory!r} does not exist (step: open); create it, or point "
            f"{_DIR_VAR} (the disk allocator's directory) at an existing directory"
        )
    if not is_dir:
        raise DiskStorageError(
            f"{_TIER}: {directory!r} is not a directory (step: open); point {_DIR_VAR} "
            "(the disk allocator's directory) at a directory"
        )


def _code(exc: OSError) -> str:
    """``ENOSPC``: the errno's name, as man pages and file system documentation spell it."""
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _open_error(path: str, directory: str, exc: OSError, o_direct: bool) -> DiskStorageError:
    fs = fs_type(directory)
    code = _code(exc)
    if exc.errno == errno.EINVAL and o_direct:
        why = (
            f"the file system of {directory!r} ({fs}) does not support O_DIRECT; {_NO_O_DIRECT}, "
            f"or choose another {_DIR_VAR}"
        )
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = (
            f"{directory!r} ({fs}) is read-only or not writable by this user ({code}); "
            f"set {_DIR_VAR} to a writable directory"
        )
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"no space or inodes left on {directory!r} ({fs}); free some, or choose another {_DIR_VAR}"
    else:
        why = f"{exc.strerror} ({code}) on {directory!r} ({fs}); check the directory, or choose another {_DIR_VAR}"
    return DiskStorageError(f"{_TIER}: cannot create {path} (step: open): {why}")


def _reserve(fd: int, path: str, directory: str, file_size: int, spec: DiskAllocator) -> str:
    """Reserve ``file_size`` bytes for the file: ``"fallocate"``, ``"zerofill"`` or ``"truncate"``."""
    while True:
        try:
            _libc.fallocate(fd, 0, file_size)
            return "fallocate"
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                break
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(path, directory, file_size, "fallocate") from exc
            if exc.errno == errno.EFBIG:
                what = (
                    "the file is larger than the file system allows; make the disk tier smaller "
                    f"(DYN_KVBM_DISK_CACHE_GB, num_blocks) or choose another {_DIR_VAR}"
                )
            else:
                what = (
                    f"choose another {_DIR_VAR}; DYN_KVBM_DISK_ZEROFILL_FALLBACK=1 (zero-fill instead) applies only "
                    "where the file system says fallocate is unsupported (EOPNOTSUPP), which this is not"
                )
            raise DiskStorageError(
                f"{_TIER}: cannot reserve {format_bytes(file_size)} for {path} (step: fallocate): {exc.strerror} "
                f"({_code(exc)}, {fs_type(directory)}); {what}"
            ) from exc
    if spec.zerofill_fallback:
        log.info("%s: fallocate unsupported on %s (%s); zero-filling %s", _TIER, directory, fs_type(directory), path)
        try:
            _zero_fill(fd, file_size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(path, directory, file_size, "zero-fill") from exc
            if exc.errno == errno.EINVAL and spec.o_direct:
                # Lustre and others refuse O_DIRECT writes that are not aligned to their own (larger) block size
                what = f"the file system ({fs_type(directory)}) refused an aligned O_DIRECT write; {_NO_O_DIRECT}"
            else:
                what = (
                    f"unset DYN_KVBM_DISK_ZEROFILL_FALLBACK (zerofill_fallback=false) to size the file without "
                    f"reserving its space, or choose another {_DIR_VAR}"
                )
            raise DiskStorageError(
                f"{_TIER}: cannot zero-fill {path} (step: zero-fill): {exc.strerror} ({_code(exc)}); {what}"
            ) from exc
        return "zerofill"
    try:
        os.ftruncate(fd, file_size)
    except OSError as exc:
        raise DiskStorageError(f"{_TIER}: cannot size {path} (step: ftruncate): {exc.strerror}") from exc
    warnings.warn(
        f"{_TIER}: the file system of {directory!r} ({fs_type(directory)}) does not support fallocate, so the "
        f"{format_bytes(file_size)} of {path} are not reserved and writes may fail later when the disk fills; "
        "set DYN_KVBM_DISK_ZEROFILL_FALLBACK=1 (zerofill_fallback=true) to reserve them by writing zeros",
        DiskReservationWarning,
        stacklevel=3,
    )
    return "truncate"


def _no_space(path: str, directory: str, needed: int, step: str) -> DiskStorageError:
    try:
        st = os.statvfs(directory)
        free = format_bytes(st.f_bavail * st.f_frsize)
    except OSError:
        free = "unknown"
    return DiskStorageError(
        f"{_TIER}: not enough space for {path} (step: {step}): {format_bytes(needed)} needed, {free} free in "
        f"{directory!r}; make the disk tier smaller (DYN_KVBM_DISK_CACHE_GB, num_blocks) or point {_DIR_VAR} "
        "at a larger file system"
    )


def _zero_fill(fd: int, file_size: int) -> None:
    with _aligned_buffer(_BOUNCE) as zeros:  # zeroed by the kernel
        for offset in range(0, file_size, _BOUNCE):
            with memoryview(zeros) as whole, whole[: min(_BOUNCE, file_size - offset)] as piece:
                _pwrite_all(fd, piece, offset)


@contextmanager
def _aligned_buffer(size: int) -> Iterator[mmap.mmap]:
    """A page-aligned scratch buffer (O_DIRECT accepts it), unmapped afterwards. Views of it must be released before
    an error leaves their frame: a traceback holding one would keep the buffer mapped as long as the error lives."""
    buffer = _libc.map_anonymous(size)
    try:
        yield buffer
    finally:
        with suppress(BufferError):  # a view still held elsewhere: the collector unmaps it with the last one
            _libc.close_mapping(buffer)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        with view[done:] as rest:  # released before an error leaves: a traceback must not keep the buffer exported
            n = os.pwrite(fd, rest, offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        with view[done:] as rest:
            n = os.preadv(fd, [rest], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "unexpected end of file")
        done += n


def _aligned(view: memoryview, offset: int) -> bool:
    """True when O_DIRECT can use the caller's buffer as it is."""
    if offset % ALIGNMENT or len(view) % ALIGNMENT or not len(view):
        return False
    if view.readonly:
        return False  # no portable way to learn its address: bounce it
    import ctypes

    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor) % ALIGNMENT == 0
    finally:
        del anchor


def _offset(offset: object, what: str) -> int:
    if isinstance(offset, bool) or not hasattr(type(offset), "__index__"):
        raise LayoutError(f"{_TIER}: cannot {what}: the offset must be an integer, got {offset!r}")
    return operator.index(offset)  # type: ignore[arg-type]


def _bytes_of(data: object, call: str, *, writable: bool) -> memoryview:
    """The bytes of a contiguous buffer of plain numbers (bytes, bytearray, a numeric numpy array, mmap, ...) as a
    flat view. Anything else (object, structured, string or datetime arrays; pointers) is a StorageBufferError:
    its bytes are not values a file can hold, and writing into an object array's pointers would crash."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise StorageBufferError(
            f"{_TIER}: {call} needs a buffer (bytes, bytearray, a numpy array, ...), got {type(data).__name__}"
        ) from None
    except (ValueError, BufferError) as exc:  # numpy's datetime64 arrays, a closed mmap, ...
        raise StorageBufferError(
            f"{_TIER}: {call} needs a buffer of plain numbers or bytes; the {type(data).__name__} given exports none "
            f"({exc}): pass a numeric array (e.g. numpy.uint8, float16) or bytes"
        ) from None
    if not _PLAIN.fullmatch(view.format):
        what = getattr(data, "dtype", None) or f"buffer format {view.format!r}"
        raise StorageBufferError(
            f"{_TIER}: {call} needs a buffer of plain numbers or bytes, got a {type(data).__name__} of {what}; "
            "object, structured, string, boolean and datetime data are refused: pass a numeric array (e.g. "
            "numpy.uint8, float16) or bytes"
        )
    if writable and view.readonly:
        raise StorageBufferError(f"{_TIER}: {call} needs a writable buffer, got a read-only {type(data).__name__}")
    try:
        return view.cast("B")
    except TypeError:
        raise StorageBufferError(
            f"{_TIER}: {call} needs a contiguous buffer, got a non-contiguous {type(data).__name__} "
            "(copy it first, e.g. numpy.ascontiguousarray)"
        ) from None


def _remove(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


def fs_type(directory: str) -> str:
    """``"overlay at /"``: the file system a directory lives on, from /proc/self/mounts (best effort)."""
    try:
        real = os.path.realpath(directory)
        best, kind = "", "unknown file system"
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                point = parts[1].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, parts[2]
        return f"{kind} at {best}" if best else kind
    except OSError:
        return "unknown file system"
