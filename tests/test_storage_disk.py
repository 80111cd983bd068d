"""The disk tier (G3): one file per storage, reserved up front, removed on close, and errors that say
which step failed and which variable changes it. Every failure leaves the directory as it was."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm_builder import AllocationError, DiskAllocator, DiskStorageError, KvbmError, LayoutError, StorageKind
from kvbm_builder.config.protocols import Storage
from kvbm_builder.storage import (
    DiskReservationWarning,
    DiskStorage,
    StorageBufferError,
    StorageClosedError,
    _libc,
    allocate,
    allocate_disk,
)
from kvbm_builder.storage import disk as disk_module

MiB = 2**20


def spec(directory: Path, **kw: bool) -> DiskAllocator:
    return DiskAllocator(directory=str(directory), **kw)


def test_a_disk_storage_is_a_private_reserved_file(tmp_path: Path) -> None:
    with allocate_disk(MiB + 100, spec(tmp_path)) as storage:
        assert isinstance(storage, Storage)
        assert storage.kind is StorageKind.DISK
        assert (storage.addr, storage.size) == (0, MiB + 100)
        assert storage.device_id == storage.fd  # NIXL's devId for FILE memory
        assert re.fullmatch(rf"kvbm-g3-{os.getpid()}-[0-9a-f]{{12}}\.bin", Path(storage.path).name)
        info = os.stat(storage.path)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_size == MiB + 4096  # whole 4096-byte blocks, for O_DIRECT
        assert info.st_blocks * 512 >= MiB + 100  # really reserved, not sparse
        assert storage.reserved == "fallocate"
        assert storage.o_direct
        assert os.get_blocking(storage.fd) and fcntl_flags(storage.fd) & os.O_DIRECT


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_close_closes_and_removes_the_file_once(tmp_path: Path) -> None:
    storage = allocate(DiskAllocator(directory=str(tmp_path)), 8192)
    assert isinstance(storage, DiskStorage)
    storage.close()
    storage.close()
    assert storage.closed
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        os.fstat(storage.fd)
    with pytest.raises(StorageClosedError, match=r"disk tier \(G3\)"):
        storage.write(0, b"x")


def test_two_storages_get_two_files(tmp_path: Path) -> None:
    with allocate_disk(4096, spec(tmp_path)) as a, allocate_disk(4096, spec(tmp_path)) as b:
        assert a.path != b.path
        assert len(list(tmp_path.iterdir())) == 2


def test_without_o_direct(tmp_path: Path) -> None:
    with allocate_disk(10_000, spec(tmp_path, o_direct=False)) as storage:
        assert not storage.o_direct and not fcntl_flags(storage.fd) & os.O_DIRECT
        storage.write(3, b"abc")
        out = bytearray(5)
        storage.read_into(2, out)
        assert out == b"\0abc\0"


# --- reading and writing --------------------------------------------------------------------------------


def test_aligned_io_goes_straight_to_the_file(tmp_path: Path) -> None:
    with allocate_disk(MiB, spec(tmp_path)) as storage:
        block = np.zeros(8192 + 4096, dtype=np.uint8)
        start = (-block.ctypes.data) % 4096  # an aligned window inside it
        data = block[start : start + 8192]
        data[:] = np.arange(8192) % 251
        storage.write(4096, data)
        back = np.zeros_like(block)
        out = back[start : start + 8192]
        storage.read_into(4096, out)
        assert np.array_equal(out, data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    writes=st.lists(
        st.tuples(st.integers(min_value=0, max_value=3 * 4096 + 50), st.binary(min_size=0, max_size=9000)),
        max_size=6,
    ),
    o_direct=st.booleans(),
)
def test_any_offset_and_length_round_trip(tmp_path: Path, writes: list[tuple[int, bytes]], o_direct: bool) -> None:
    size = 3 * 4096 + 50 + 9000
    model = bytearray(size)
    with allocate_disk(size, spec(tmp_path, o_direct=o_direct)) as storage:
        for offset, data in writes:
            storage.write(offset, data)
            model[offset : offset + len(data)] = data
        whole = bytearray(size)
        storage.read_into(0, whole)
        assert whole == model
        for offset, data in writes:
            piece = np.empty(len(data), dtype=np.uint8)
            storage.read_into(offset, piece)
            assert piece.tobytes() == model[offset : offset + len(data)]


def test_io_outside_the_storage_is_refused(tmp_path: Path) -> None:
    with allocate_disk(10_000, spec(tmp_path)) as storage:
        with pytest.raises(LayoutError, match=r"disk tier \(G3\): cannot write \[9999, 10001\).*holds 10000 bytes"):
            storage.write(9999, b"ab")
        with pytest.raises(LayoutError, match="cannot read"):
            storage.read_into(-1, bytearray(1))
        with pytest.raises(TypeError, match="writable"):
            storage.read_into(0, b"read-only")


# --- failures leave nothing behind ----------------------------------------------------------------------


def test_a_missing_directory_names_the_path_and_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DiskStorageError, match=r"does not exist \(step: open\).*DYN_KVBM_DISK_CACHE_DIR") as caught:
        allocate_disk(4096, spec(missing))
    assert str(missing) in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_file_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(DiskStorageError, match=r"is not a directory \(step: open\).*DYN_KVBM_DISK_CACHE_DIR"):
        allocate_disk(4096, spec(tmp_path / "file"))


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_directory_names_the_step_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # tests run as root, where chmod cannot make a directory read-only: the file system says no instead
    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(DiskStorageError) as caught:
        allocate_disk(4096, spec(tmp_path))
    message = str(caught.value)
    assert "(step: open)" in message and "read-only or not writable" in message
    assert "DYN_KVBM_DISK_CACHE_DIR" in message and str(tmp_path) in message
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_file_system_without_o_direct_points_at_the_variable_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    real_fcntl = fcntl.fcntl

    def like_old_tmpfs(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:  # the file is created, then O_DIRECT is refused
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", like_old_tmpfs)
    with pytest.raises(DiskStorageError, match=r"does not support O_DIRECT; set DYN_KVBM_DISK_DISABLE_O_DIRECT=1"):
        allocate_disk(4096, spec(tmp_path))
    assert list(tmp_path.iterdir()) == []
    with allocate_disk(4096, spec(tmp_path, o_direct=False)) as storage:  # what the message says to do
        assert not storage.o_direct


def test_a_full_disk_says_how_much_is_needed_and_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int, mode: int = 0) -> None:
        raise OSError(errno.ENOSPC, "fallocate: No space left on device")

    monkeypatch.setattr(_libc, "fallocate", full)
    with pytest.raises(DiskStorageError) as caught:
        allocate_disk(3 * 2**30, spec(tmp_path))
    message = str(caught.value)
    assert "not enough space" in message and "(step: fallocate)" in message
    assert "3.00 GiB (3.22 GB) needed" in message and " free in " in message
    assert "DYN_KVBM_DISK_CACHE_GB" in message and "DYN_KVBM_DISK_CACHE_DIR" in message
    assert list(tmp_path.iterdir()) == []


def refuse_fallocate(fd: int, offset: int, length: int, mode: int = 0) -> None:
    raise OSError(errno.EOPNOTSUPP, "fallocate: Operation not supported")


def test_without_fallocate_the_file_is_truncated_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_libc, "fallocate", refuse_fallocate)
    with pytest.warns(DiskReservationWarning, match="DYN_KVBM_DISK_ZEROFILL_FALLBACK=1"):
        storage = allocate_disk(MiB, spec(tmp_path))
    with storage:
        assert storage.reserved == "truncate"
        assert os.stat(storage.path).st_size == MiB
        assert os.stat(storage.path).st_blocks == 0  # sparse: nothing reserved


def test_without_fallocate_zerofill_reserves_by_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_libc, "fallocate", refuse_fallocate)
    with allocate_disk(MiB + 1, spec(tmp_path, zerofill_fallback=True)) as storage:
        assert storage.reserved == "zerofill"
        info = os.stat(storage.path)
        assert info.st_size == MiB + 4096 and info.st_blocks * 512 >= MiB + 4096


def test_a_full_disk_during_zerofill_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_libc, "fallocate", refuse_fallocate)

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(DiskStorageError, match=r"not enough space .*\(step: zero-fill\)"):
        allocate_disk(MiB, spec(tmp_path, zerofill_fallback=True))
    assert list(tmp_path.iterdir()) == []


def test_other_fallocate_failures_name_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, offset: int, length: int, mode: int = 0) -> None:
        raise OSError(errno.EIO, "fallocate: Input/output error")

    monkeypatch.setattr(_libc, "fallocate", broken)
    with pytest.raises(DiskStorageError, match=r"\(step: fallocate\): fallocate: Input/output error"):
        allocate_disk(4096, spec(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_the_file_system_is_named(tmp_path: Path) -> None:
    assert re.fullmatch(r"\S+ at /.*", disk_module.fs_type(str(tmp_path)))


# --- what the messages tell the user to change -----------------------------------------------------------


def refuse_pwrite(code: int) -> Callable[[int, object, int], int]:
    def refuse(fd: int, data: object, offset: int) -> int:
        raise OSError(code, os.strerror(code))

    return refuse


def test_a_zero_fill_refused_under_o_direct_points_at_disabling_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_libc, "fallocate", refuse_fallocate)
    monkeypatch.setattr(os, "pwrite", refuse_pwrite(errno.EINVAL))  # as Lustre refuses some O_DIRECT writes
    with pytest.raises(DiskStorageError) as caught:
        allocate_disk(MiB, spec(tmp_path, zerofill_fallback=True))
    message = str(caught.value)
    assert "(step: zero-fill)" in message and "EINVAL" in message
    assert "set DYN_KVBM_DISK_DISABLE_O_DIRECT=1 (o_direct=false)" in message
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_other_zero_fill_failures_say_how_to_do_without_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_libc, "fallocate", refuse_fallocate)
    monkeypatch.setattr(os, "pwrite", refuse_pwrite(errno.EIO))
    with pytest.raises(DiskStorageError, match=r"\(step: zero-fill\).*EIO.*unset DYN_KVBM_DISK_ZEROFILL_FALLBACK"):
        allocate_disk(MiB, spec(tmp_path, zerofill_fallback=True, o_direct=False))


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (errno.EINVAL, "DYN_KVBM_DISK_ZEROFILL_FALLBACK=1 (zero-fill instead) applies only where"),
        (errno.EFBIG, "larger than the file system allows; make the disk tier smaller (DYN_KVBM_DISK_CACHE_GB"),
    ],
)
def test_a_refused_fallocate_says_what_the_variables_can_and_cannot_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, hint: str
) -> None:
    def refuse(fd: int, offset: int, length: int, mode: int = 0) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_libc, "fallocate", refuse)
    with pytest.raises(DiskStorageError, match=r"\(step: fallocate\)") as caught:
        allocate_disk(4096, spec(tmp_path))
    assert hint in str(caught.value) and errno.errorcode[code] in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "o_direct", "hint"),
    [
        (errno.EINVAL, True, "refused an O_DIRECT write; set DYN_KVBM_DISK_DISABLE_O_DIRECT=1"),
        (errno.EIO, True, "check the file system"),
        (errno.ENOSPC, False, "the file system is full"),
    ],
)
def test_a_failed_write_says_what_to_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, o_direct: bool, hint: str
) -> None:
    with allocate_disk(8192, spec(tmp_path, o_direct=o_direct)) as storage:
        monkeypatch.setattr(os, "pwrite", refuse_pwrite(code))
        with pytest.raises(DiskStorageError, match=r"disk tier \(G3\): write failed on ") as caught:
            storage.write(100, b"abc")
        assert hint in str(caught.value) and errno.errorcode[code] in str(caught.value)


# --- arguments -------------------------------------------------------------------------------------------


def test_io_needs_an_integer_offset_and_a_contiguous_buffer(tmp_path: Path) -> None:
    with allocate_disk(8192, spec(tmp_path)) as storage:
        with pytest.raises(StorageBufferError, match=r"disk tier \(G3\): write\(\) needs a buffer .*got int"):
            storage.write(0, 123)
        with pytest.raises(LayoutError, match=r"the offset must be an integer, got 1.5"):
            storage.write(1.5, b"x")  # type: ignore[arg-type]
        with pytest.raises(LayoutError, match=r"the offset must be an integer, got True"):
            storage.write(True, b"x")
        every_other = np.zeros(20, dtype=np.uint8)[::2]
        with pytest.raises(StorageBufferError, match="non-contiguous ndarray"):
            storage.write(0, every_other)
        with pytest.raises(StorageBufferError, match="needs a writable buffer, got a read-only bytes"):
            storage.read_into(0, b"read-only")
        storage.write(np.int64(4), b"numpy ints are integers")
        out = bytearray(23)
        storage.read_into(np.uint16(4), out)
        assert out == b"numpy ints are integers"
    assert issubclass(StorageBufferError, TypeError) and issubclass(StorageBufferError, KvbmError)


def test_a_size_whose_file_would_pass_2_63_is_refused(tmp_path: Path) -> None:
    # the file is whole 4096-byte blocks and fallocate takes a signed 64-bit length: 2**63 - 1 rounds past it
    with pytest.raises(AllocationError, match=r"disk tier \(G3\): cannot allocate 9223372036854775807 bytes"):
        allocate_disk(2**63 - 1, spec(tmp_path))
    assert list(tmp_path.iterdir()) == []


# --- releasing -------------------------------------------------------------------------------------------


def test_a_file_that_cannot_be_removed_keeps_the_storage_open_until_a_retry_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = allocate_disk(8192, spec(tmp_path))

    def busy(path: str) -> None:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)

    monkeypatch.setattr(os, "unlink", busy)
    with pytest.raises(DiskStorageError, match=r"cannot remove .*\(step: close\).*EBUSY.*call close\(\) again"):
        storage.close()
    assert not storage.closed and os.path.exists(storage.path)
    with pytest.raises(StorageClosedError, match="being closed"):
        storage.write(0, b"x")
    monkeypatch.undo()
    # the descriptor was closed by the first try: its number now belongs to the next file opened
    other = tmp_path / "other"
    fd = os.open(other, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert fd == storage.fd
        storage.close()
        assert storage.closed and sorted(p.name for p in tmp_path.iterdir()) == ["other"]
        os.fstat(fd)  # the retry closed nothing that was not its own
    finally:
        os.close(fd)


# --- concurrent writers ----------------------------------------------------------------------------------


class WatchedLock:
    """A real lock that sets ``waited`` when a thread has to wait for it."""

    def __init__(self, waited: threading.Event) -> None:
        self._lock = threading.Lock()
        self.waited = waited

    def __enter__(self) -> WatchedLock:
        if not self._lock.acquire(blocking=False):
            self.waited.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_unaligned_writers_of_disjoint_ranges_in_one_block_keep_each_others_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under O_DIRECT both writes read, patch and write back the same 4096-byte block. The second writer is
    started while the first sits between its read and its write back: it must wait, not write first and then
    have its bytes overwritten by the first writer's stale copy."""
    with allocate_disk(8192, spec(tmp_path)) as storage:
        assert storage.o_direct
        waited_or_done = threading.Event()
        monkeypatch.setattr(storage, "_rmw_lock", WatchedLock(waited_or_done), raising=False)

        def write_the_next_208_bytes() -> None:
            storage.write(208, b"B" * 208)
            waited_or_done.set()

        second = threading.Thread(target=write_the_next_208_bytes)
        real_pwrite_all = disk_module._pwrite_all

        def first_writes_back_last(fd: int, view: memoryview, offset: int) -> None:
            if not second.ident:  # the first writer, about to write its block back
                second.start()
                assert waited_or_done.wait(60), "the second writer neither waited for the block nor finished"
            real_pwrite_all(fd, view, offset)

        monkeypatch.setattr(disk_module, "_pwrite_all", first_writes_back_last)
        storage.write(0, b"A" * 208)
        second.join()
        out = bytearray(416)
        storage.read_into(0, out)
        assert out == b"A" * 208 + b"B" * 208


# --- buffers of plain numbers only -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "buffer",
    [
        np.zeros(4, dtype=object),
        np.zeros(4, dtype="M8[s]"),
        np.zeros(4, dtype="m8[s]"),
        np.zeros(4, dtype=[("k", "<u2"), ("v", "<u2")]),
        np.zeros(4, dtype="U2"),
        np.zeros(4, dtype=bool),
        np.zeros(4, dtype="V4"),
    ],
    ids=["object", "datetime64", "timedelta64", "structured", "unicode", "bool", "void"],
)
def test_io_refuses_buffers_that_are_not_plain_numbers(tmp_path: Path, buffer: np.ndarray) -> None:
    with allocate_disk(8192, spec(tmp_path)) as storage:
        storage.write(0, np.arange(64, dtype=np.uint64))  # pointers' worth of bytes an object array would take
        with pytest.raises(StorageBufferError, match=r"disk tier \(G3\): read_into\(\) needs a buffer of plain num"):
            storage.read_into(0, buffer)
        with pytest.raises(StorageBufferError, match=r"write\(\) needs a buffer of plain numbers"):
            storage.write(0, buffer)
    if buffer.dtype == object:
        assert buffer.tolist() == [0, 0, 0, 0]  # untouched: still four real objects


@pytest.mark.parametrize("dtype", ["u1", "i2", ">f2", "<f4", "c16", "i8"])
def test_io_takes_any_plain_numeric_array(tmp_path: Path, dtype: str) -> None:
    data = (np.arange(40) % 7).astype(dtype)
    with allocate_disk(8192, spec(tmp_path)) as storage:
        storage.write(10, data)
        back = np.empty_like(data)
        storage.read_into(10, back)
        assert back.tobytes() == data.tobytes()


def test_io_on_a_closed_mmap_is_a_buffer_error(tmp_path: Path) -> None:
    import mmap

    gone = mmap.mmap(-1, 4096)
    gone.close()
    with allocate_disk(8192, spec(tmp_path)) as storage, pytest.raises(StorageBufferError, match="exports none"):
        storage.write(0, gone)


# --- close() while reads and writes run -------------------------------------------------------------------


def test_close_waits_for_io_in_flight_and_never_lets_it_reach_a_reused_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write is parked between two pwrite() calls of one request; close() is called meanwhile. It must wait for the
    write, not close the descriptor under it (the second pwrite would go to whatever file got the number next)."""
    storage = allocate_disk(3 * 4096, spec(tmp_path, o_direct=False))
    parked, resume = threading.Event(), threading.Event()
    real_pwrite = os.pwrite
    calls = 0

    def short_then_parked(fd: int, data: object, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:  # a short write: the rest comes in a second call, on the same descriptor
            n = real_pwrite(fd, memoryview(data)[:100], offset)  # type: ignore[arg-type]
            parked.set()
            assert resume.wait(60)
            return n
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", short_then_parked)
    writer = threading.Thread(target=storage.write, args=(0, b"W" * 4096))
    writer.start()
    assert parked.wait(60)
    closer = threading.Thread(target=storage.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "close() returned while a write was in flight"
    with pytest.raises(StorageClosedError, match="being closed"):
        storage.write(0, b"late")  # new I/O is refused as soon as close() starts
    resume.set()
    writer.join(60)
    closer.join(60)
    assert storage.closed and list(tmp_path.iterdir()) == []
    assert calls == 2
