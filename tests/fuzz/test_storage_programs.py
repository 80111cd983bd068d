"""Fuzz family "storage programs": random sequences of allocate, unaligned and concurrent write / read_into (through
every kind of buffer), views, close (also while I/O runs, also with views alive), dropping a storage unclosed, and
``os.chdir`` (into a directory that is then removed, too), on system and disk storages, checked against a model.

Every input must keep every byte (what was written reads back byte for byte, through the file or through any view,
also after the storage was closed while the view lived), raise nothing but the KvbmErrors the model expects, finish
in bounded time (a watchdog), and leave nothing behind: no file, no descriptor (/proc/self/fd), no mapping (each
checked with the kernel as it is released, and every mapping made released by the end).
"""

from __future__ import annotations

import array
import gc
import os
import random
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from budget import fuzz
from hypothesis import given
from hypothesis import strategies as st
from storage_cases import workspace
from syscalls import Holdings, Syscalls, watchdog

from kvbm_builder import DiskAllocator, KvbmError
from kvbm_builder.errors import DiskStorageError, LayoutError
from kvbm_builder.storage import StorageBufferError, StorageClosedError, allocate_disk, allocate_system

BLOCK = 4096


@attrs.define(eq=False)
class Item:
    """A storage of the program and the model of its bytes (the model outlives the storage while views do)."""

    storage: Any
    kind: str
    model: bytearray
    closed: bool = False
    dropped: bool = False


@attrs.define(eq=False)
class View:
    array: Any  # numpy uint8 array over [offset, offset + len) of the item's memory
    item: Item
    offset: int


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    with workspace("kvbm-fuzz-storage-", ("d0/cache", "d1/cache")) as (root, _):
        yield root


def payload(rng: random.Random, max_size: int, min_size: int = 0) -> bytes:
    return rng.randbytes(rng.randint(min_size, max(min_size, max_size)))


def writable_buffer(rng: random.Random, n: int) -> tuple[Any, Callable[[Any], bytes], type[KvbmError] | None]:
    """A buffer of ``n`` bytes to read into, how to get its bytes, and the error a read into it must raise."""
    kinds = ["bytearray", "u1", "u2", "memoryview", "offset-u1", "array", "readonly", "object", "strided", "datetime"]
    kind = rng.choice(kinds)
    if kind == "bytearray":
        return bytearray(n), bytes, None
    if kind == "u1":
        return np.zeros(n, np.uint8), lambda b: b.tobytes(), None
    if kind == "u2" and n % 2 == 0:
        return np.zeros(n // 2, np.uint16), lambda b: b.tobytes(), None
    if kind == "memoryview":
        backing = bytearray(n + 7)
        return memoryview(backing)[3 : 3 + n], lambda b: bytes(b), None
    if kind == "offset-u1":  # an unaligned address inside a larger array
        return np.zeros(n + 5, np.uint8)[5:], lambda b: b.tobytes(), None
    if kind == "array" and n % 2 == 0:
        return array.array("H", bytes(n)), lambda b: b.tobytes(), None
    if kind == "readonly":
        return bytes(n), bytes, StorageBufferError
    if kind == "object":
        return np.zeros(max(1, n // 8), dtype=object), lambda b: b"", StorageBufferError
    if kind == "strided" and n > 1:
        return np.zeros(2 * n, np.uint8)[::2], lambda b: b.tobytes(), StorageBufferError
    if kind == "datetime":
        return np.zeros(max(1, n // 8), dtype="M8[s]"), lambda b: b"", StorageBufferError
    return bytearray(n), bytes, None


def data_buffer(rng: random.Random, data: bytes) -> tuple[Any, type[KvbmError] | None]:
    """``data`` in some buffer type a write takes (or one it must refuse)."""
    kind = rng.choice(["bytes", "bytearray", "u1", "f2", "memoryview", "offset-u1", "object", "strided"])
    n = len(data)
    if kind == "bytearray":
        return bytearray(data), None
    if kind == "u1":
        return np.frombuffer(data, np.uint8), None
    if kind == "f2" and n % 2 == 0:
        return np.frombuffer(data, np.float16), None
    if kind == "memoryview":
        return memoryview(b"xx" + data)[2:], None
    if kind == "offset-u1":
        padded = np.frombuffer(b"\0\0\0" + data, np.uint8)
        return padded[3:], None
    if kind == "object":
        return np.array([object()] * max(1, n // 8), dtype=object), StorageBufferError
    if kind == "strided" and n > 1:
        return np.frombuffer(data + data, np.uint8)[::2], StorageBufferError
    return data, None


class Program:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.rng = random.Random(0)  # each operation reseeds it with its own drawn seed
        self.items: list[Item] = []
        self.views: list[View] = []
        self.decoys: list[Path] = []
        os.chdir(root / "d0")

    # -- helpers -------------------------------------------------------------------------------------------

    def expect(self, error: type[BaseException] | None, action: Callable[[], Any]) -> Any:
        try:
            result = action()
        except KvbmError as exc:
            if error is None or not isinstance(exc, error):
                raise AssertionError(f"unexpected {type(exc).__name__}: {exc}") from exc
            return None
        assert error is None, f"expected {error.__name__}, nothing was raised"
        return result

    def pick(self, kind: str | None = None) -> Item | None:
        items = [i for i in self.items if not i.dropped and (kind is None or i.kind == kind)]
        return self.rng.choice(items) if items else None

    # -- operations ----------------------------------------------------------------------------------------

    def allocate(self) -> None:
        kind = self.rng.choice(["system", "disk"])
        size = self.rng.randint(1, 5 * BLOCK + 300)
        if kind == "system":
            self.items.append(Item(allocate_system(size), kind, bytearray(size)))
            return
        relative = self.rng.random() < 0.5
        spec = DiskAllocator(
            directory="cache" if relative else str(self.root / "d1" / "cache"),
            o_direct=(self.rng.random() < 0.5),
        )
        try:
            cwd = os.getcwd()
        except FileNotFoundError:
            cwd = None
        if relative and cwd is None:  # the working directory was removed: a relative directory cannot be resolved
            self.expect(DiskStorageError, lambda: allocate_disk(size, spec))
            return
        storage = allocate_disk(size, spec)
        expected_dir = os.path.join(cwd, "cache") if relative and cwd else str(self.root / "d1" / "cache")
        assert os.path.dirname(storage.path) == expected_dir and os.path.isabs(storage.path)
        self.items.append(Item(storage, kind, bytearray(size)))

    def write(self) -> None:
        item = self.pick()
        if item is None:
            return
        size = len(item.model)
        offset = self.rng.randint(0, size)
        data = payload(self.rng, min(size - offset, 3 * BLOCK + 10))
        if item.kind == "system":
            if item.closed:
                self.expect(StorageClosedError, item.storage.as_numpy)
                return
            view = item.storage.as_numpy()
            view[offset : offset + len(data)] = np.frombuffer(data, np.uint8)
            del view
            item.model[offset : offset + len(data)] = data
            return
        buffer, error = data_buffer(self.rng, data)
        if item.closed:
            error = StorageClosedError if error is None else error
        self.expect(error, lambda: item.storage.write(offset, buffer))
        if error is None:
            item.model[offset : offset + len(data)] = data

    def read(self) -> None:
        item = self.pick()
        if item is None:
            return
        size = len(item.model)
        offset = self.rng.randint(0, size)
        n = self.rng.randint(0, size - offset)
        if item.kind == "system":
            if item.closed:
                self.expect(StorageClosedError, item.storage.as_numpy)
                return
            assert item.storage.as_numpy()[offset : offset + n].tobytes() == bytes(item.model[offset : offset + n])
            return
        buffer, content, error = writable_buffer(self.rng, n)
        if item.closed:
            error = StorageClosedError if error is None else error
        self.expect(error, lambda: item.storage.read_into(offset, buffer))
        if error is None:
            assert content(buffer)[:n] == bytes(item.model[offset : offset + n])

    def out_of_range(self) -> None:
        item = self.pick("disk")
        if item is None or item.closed:
            return
        offset = self.rng.choice([-1, len(item.model) + 1, len(item.model) + BLOCK, 2**70])
        self.expect(LayoutError, lambda: item.storage.write(offset, b"x"))

    def concurrent_writes(self) -> None:
        """2 to 4 threads write disjoint ranges (often sharing a 4096-byte block) at once."""
        item = self.pick("disk")
        if item is None or item.closed:
            return
        size = len(item.model)
        cuts = sorted(self.rng.sample(range(size + 1), min(size + 1, self.rng.randint(2, 8))))
        ranges = [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if b > a][:4]
        payloads = [payload(self.rng, b - a, b - a) for a, b in ranges]
        errors: list[BaseException] = []
        # every thread exists before any writes: a thread's stack mapped while another thread releases its bounce
        # buffer could take the freed addresses and look like that buffer still mapped
        start = threading.Barrier(len(ranges))

        def write(offset: int, data: bytes) -> None:
            try:
                start.wait()
                item.storage.write(offset, data)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(a, p)) for (a, _), p in zip(ranges, payloads, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for (a, b), data in zip(ranges, payloads, strict=True):
            item.model[a:b] = data

    def close_while_writing(self) -> None:
        """close() while another thread writes: the write finishes first or is refused, and no byte of it reaches the
        file that gets the descriptor number next."""
        item = self.pick("disk")
        if item is None or item.closed:
            return
        data = b"\xab" * len(item.model)
        outcome: list[BaseException | None] = []

        def write() -> None:
            try:
                item.storage.write(0, data)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        item.storage.close()
        item.closed = True
        canary = self.root / "canary"
        fd = os.open(canary, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"c" * 64)
            writer.join()
            assert os.pread(fd, 64, 0) == b"c" * 64 and os.fstat(fd).st_size == 64
        finally:
            os.close(fd)
            canary.unlink()
        assert len(outcome) == 1 and (outcome[0] is None or isinstance(outcome[0], StorageClosedError)), outcome

    def take_view(self) -> None:
        item = self.pick("system")
        if item is None:
            return
        if item.closed:
            self.expect(StorageClosedError, item.storage.as_numpy)
            return
        size = len(item.model)
        a = self.rng.randint(0, size - 1)
        b = self.rng.randint(a + 1, size)
        self.views.append(View(item.storage.as_numpy()[a:b], item, a))

    def use_view(self) -> None:
        if not self.views:
            return
        view = self.rng.choice(self.views)
        n = len(view.array)
        a = self.rng.randint(0, n - 1)
        data = payload(self.rng, n - a, 1)
        view.array[a : a + len(data)] = np.frombuffer(data, np.uint8)  # also after close: the view holds it
        view.item.model[view.offset + a : view.offset + a + len(data)] = data
        whole = view.item.model[view.offset : view.offset + n]
        assert view.array.tobytes() == bytes(whole)

    def drop_view(self) -> None:
        if self.views:
            self.views.pop(self.rng.randint(0, len(self.views) - 1))

    def close(self) -> None:
        item = self.pick()
        if item is None:
            return
        item.storage.close()
        item.storage.close()  # idempotent
        item.closed = True
        assert item.storage.closed

    def drop_unclosed(self) -> None:
        """Forget a storage without closing it: the collector closes it; views of it keep working."""
        item = self.pick()
        if item is None:
            return
        path = getattr(item.storage, "path", None)
        item.storage = None
        item.dropped = True
        item.closed = True
        gc.collect()
        if path is not None:
            assert not os.path.exists(path)

    def chdir(self) -> None:
        target = self.rng.choice(["d0", "d1", "gone"])
        if target == "gone":  # a working directory that is removed under the process
            gone = Path(tempfile.mkdtemp(dir=self.root))
            os.chdir(gone)
            gone.rmdir()
            return
        os.chdir(self.root / target)
        # a file with the name of every open relative-path storage, here: close() must not remove it
        for item in self.items:
            path = getattr(item.storage, "path", None)
            if item.kind == "disk" and not item.closed and path is not None:
                decoy = self.root / target / "cache" / os.path.basename(path)
                if not decoy.exists():
                    decoy.write_bytes(b"not yours")
                    self.decoys.append(decoy)

    def finish(self) -> None:
        for item in self.items:
            if not item.dropped:
                item.storage.close()
        for decoy in self.decoys:
            assert decoy.read_bytes() == b"not yours", f"{decoy} was touched"
            decoy.unlink()
        for view in self.views:  # the views still show their bytes, after every close
            assert view.array.tobytes() == bytes(view.item.model[view.offset : view.offset + len(view.array)])
        self.views.clear()
        self.items.clear()


SEEDS = st.integers(0, 2**32 - 1)  # an operation draws its details from a generator seeded with its own seed
OPERATIONS = [
    "allocate",
    "write",
    "read",
    "out_of_range",
    "concurrent_writes",
    "close_while_writing",
    "take_view",
    "use_view",
    "drop_view",
    "close",
    "drop_unclosed",
    "chdir",
]


@fuzz()
@given(first=st.integers(0, 2**32 - 1), operations=st.lists(st.tuples(st.sampled_from(OPERATIONS), SEEDS), max_size=14))
def test_storage_programs_keep_every_byte_and_leak_nothing(
    work: Path, first: int, operations: list[tuple[str, int]]
) -> None:
    cwd = os.getcwd()
    with watchdog(60), Syscalls() as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        holdings = Holdings(str(work), empty=[str(work / "d0" / "cache"), str(work / "d1" / "cache")])
        program = Program(work)
        try:
            program.rng.seed(first)
            program.allocate()
            for name, seed in operations:
                program.rng.seed(seed)
                getattr(program, name)()
            program.finish()
        finally:
            os.chdir(cwd)
            for item in program.items:  # after a finding: release what is left, so the next input starts clean
                if item.storage is not None:
                    item.storage.close()
        del program
        assert holdings.leaks(calls) == []
