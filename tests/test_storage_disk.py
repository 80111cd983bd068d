"""The disk tier (G3): one file per storage, reserved up front, removed on close, and errors that say
which step failed and which variable changes it. Every failure leaves the directory as it was."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm_builder import DiskAllocator, DiskStorageError, LayoutError, StorageKind
from kvbm_builder.config.protocols import Storage
from kvbm_builder.storage import DiskReservationWarning, DiskStorage, StorageClosedError, _libc, allocate_disk
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
    storage = DiskAllocator(directory=str(tmp_path)).allocate(8192)
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
    real_open = os.open

    def like_old_tmpfs(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:  # the file is created, then O_DIRECT is refused
            os.close(real_open(path, flags & ~os.O_DIRECT, mode))
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", like_old_tmpfs)
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
