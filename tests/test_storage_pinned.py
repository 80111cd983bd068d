"""The pinned host tier's machinery that runs without a GPU: mapping, NUMA placement, parallel page
population and progress; and the clear error a pinned tier gives where CUDA cannot be used.

The CUDA part (cudaHostRegister, cudaHostAlloc, copies) is tested in test_storage_gpu.py.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_builder import AllocationError, ConfigError, GpuUnavailableError, KvbmError, PinnedAllocator
from kvbm_builder.storage import PinTuning, _host, _libc, allocate, allocate_pinned, cuda_available

MiB = 2**20


def resident_pages(addr: int, length: int) -> int:
    """How many pages of ``[addr, addr + length)`` are in memory right now (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-length // _libc.PAGE_SIZE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec)


@pytest.fixture
def mapping() -> Iterator[_host.HostMapping]:
    m = _host.map_host(8 * MiB, "host tier (G2)")
    yield m
    m.unmap()


def record() -> tuple[list[tuple[int, int]], _host.Progress]:
    calls: list[tuple[int, int]] = []
    return calls, _host.Progress(lambda done, total: calls.append((done, total)), 8 * MiB, interval=0)


# --- population -----------------------------------------------------------------------------------------


def test_populate_faults_every_page_in_on_several_threads(mapping: _host.HostMapping) -> None:
    assert resident_pages(mapping.addr, mapping.length) == 0
    calls, progress = record()
    method = _host.populate(mapping, "host tier (G2)", threads=4, chunk_bytes=MiB, progress=progress)
    assert method == "madvise"  # MADV_POPULATE_WRITE: Linux >= 5.14
    assert resident_pages(mapping.addr, mapping.length) == mapping.length // _libc.PAGE_SIZE
    assert calls[-1] == (8 * MiB, 8 * MiB)


def test_populate_falls_back_to_memset_on_kernels_without_populate_write(
    mapping: _host.HostMapping, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_madvise = _libc.madvise

    def old_kernel(addr: int, length: int, advice: int) -> None:
        if advice == _libc.MADV_POPULATE_WRITE:
            raise OSError(errno.EINVAL, "madvise: Invalid argument")
        real_madvise(addr, length, advice)

    monkeypatch.setattr(_libc, "madvise", old_kernel)
    _, progress = record()
    assert _host.populate(mapping, "host tier (G2)", threads=2, chunk_bytes=MiB, progress=progress) == "memset"
    assert resident_pages(mapping.addr, mapping.length) == mapping.length // _libc.PAGE_SIZE


def test_running_out_of_memory_while_populating_names_the_tier_and_what_is_available(
    mapping: _host.HostMapping, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(addr: int, length: int, advice: int) -> None:
        raise OSError(errno.ENOMEM, "madvise: Cannot allocate memory")

    monkeypatch.setattr(_libc, "madvise", out_of_memory)
    _, progress = record()
    with pytest.raises(AllocationError, match=r"host tier \(G2\): could not populate .*MemAvailable is"):
        _host.populate(mapping, "host tier (G2)", threads=2, chunk_bytes=MiB, progress=progress)


def test_an_exception_from_the_progress_callback_stops_the_work(mapping: _host.HostMapping) -> None:
    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        if done:
            raise Stop

    progress = _host.Progress(stop, mapping.length, interval=0)
    with pytest.raises(Stop):
        _host.populate(mapping, "host tier (G2)", threads=2, chunk_bytes=MiB, progress=progress)


# --- progress -------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(min_value=1, max_value=10**12),
    phases=st.integers(min_value=1, max_value=3),
    cuts=st.lists(st.floats(min_value=0, max_value=1), max_size=30),
)
def test_progress_only_grows_and_ends_exactly_at_the_total(total: int, phases: int, cuts: list[float]) -> None:
    calls: list[tuple[int, int]] = []
    work = total * phases
    progress = _host.Progress(lambda d, t: calls.append((d, t)), total, work=work, interval=0)
    progress.start()
    for cut in cuts:
        progress.add(int(cut * work / max(1, len(cuts))))
    progress.finish()
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert all(t == total and 0 <= d <= total for d, t in calls)
    assert calls[0][0] == 0 and calls[-1] == (total, total)


def test_progress_is_throttled_but_always_reports_the_end() -> None:
    calls: list[tuple[int, int]] = []
    progress = _host.Progress(lambda d, t: calls.append((d, t)), 1000, interval=3600)
    progress.start()
    for _ in range(1000):
        progress.add(1)
    progress.finish()
    assert calls == [(0, 1000), (1000, 1000)]


# --- chunks ---------------------------------------------------------------------------------------------


@given(
    length=st.integers(min_value=1, max_value=10**9),
    chunk=st.integers(min_value=1, max_value=10**8),
    align=st.sampled_from([4096, 2 * MiB]),
)
def test_chunks_cover_the_range_once_on_aligned_boundaries(length: int, chunk: int, align: int) -> None:
    pieces = _host.chunks(length, max(chunk, length // 10_000), align)
    assert pieces[0][0] == 0
    assert sum(n for _, n in pieces) == length
    for (off, n), (next_off, _) in itertools.pairwise(pieces):
        assert off + n == next_off and next_off % align == 0


@settings(max_examples=30, deadline=None)
@given(count=st.integers(min_value=0, max_value=300), threads=st.integers(min_value=1, max_value=9))
def test_run_chunks_does_every_piece_once_and_reports_each(count: int, threads: int) -> None:
    worked: list[int] = []
    reported: list[int] = []
    caller = threading.get_ident()

    def on_done(n: int) -> None:
        assert threading.get_ident() == caller  # progress is reported from the allocating thread
        reported.append(n)

    _host.run_chunks([(i, i + 1) for i in range(count)], lambda off, n: worked.append(off), threads, on_done, "t")
    assert sorted(worked) == list(range(count))
    assert sorted(reported) == [i + 1 for i in range(count)]


def test_run_chunks_raises_the_first_failure() -> None:
    finished: list[int] = []

    def work(off: int, n: int) -> None:
        if off == 3:
            raise OSError(errno.EIO, "boom")

    with pytest.raises(OSError, match="boom"):
        _host.run_chunks([(i, 1) for i in range(8)], work, 4, finished.append, "test")
    assert len(finished) < 8


# --- mappings and NUMA ----------------------------------------------------------------------------------


def test_transparent_huge_pages_get_a_2mib_aligned_range() -> None:
    m = _host.map_host(6 * MiB + 5, "host tier (G2)", thp=True)
    try:
        assert m.addr % (2 * MiB) == 0
        assert m.length == 6 * MiB + _libc.PAGE_SIZE
        assert m.pages in ("thp", "4k")  # "4k" where THP is compiled out or set to never
    finally:
        m.unmap()


def test_huge_pages_fall_back_to_transparent_ones_with_a_warning_saying_how_to_reserve_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    free = _host.meminfo("HugePages_Free") or 0
    with caplog.at_level(logging.WARNING, "kvbm_builder.storage"):
        m = _host.map_host(4 * MiB, "host tier (G2)", hugetlb=True)
    try:
        if free * _host.huge_page_size() >= 4 * MiB:
            assert m.pages == "hugetlb"
        else:
            assert m.pages in ("thp", "4k")
            assert "vm.nr_hugepages" in caplog.text and "host tier (G2)" in caplog.text
    finally:
        m.unmap()


def numa_policy(addr: int) -> str:
    """The NUMA policy of the mapping at ``addr``, as /proc/self/numa_maps shows it (``bind:0``)."""
    with open("/proc/self/numa_maps") as f:
        for line in f:
            start, policy = line.split()[:2]
            if int(start, 16) == addr:
                return policy
    raise AssertionError(f"no mapping starts at 0x{addr:x}")


@pytest.mark.parametrize(("strict", "policy"), [(True, "bind:0"), (False, "prefer:0")])
def test_placing_memory_on_a_numa_node(mapping: _host.HostMapping, strict: bool, policy: str) -> None:
    _host.place(mapping, 0, "host tier (G2)", strict=strict)
    assert numa_policy(mapping.addr) == policy
    _, progress = record()
    _host.populate(mapping, "host tier (G2)", threads=1, chunk_bytes=MiB, progress=progress)
    assert resident_pages(mapping.addr, mapping.length) == mapping.length // _libc.PAGE_SIZE


def test_binding_to_a_node_that_does_not_exist_is_an_error_only_when_strict(mapping: _host.HostMapping) -> None:
    missing = _host.numa_node_count() + 40
    _host.place(mapping, missing, "host tier (G2)", strict=False)  # preferred: best effort
    with pytest.raises(AllocationError, match=rf"NUMA node {missing}.*DYN_KVBM_ENABLE_NUMA"):
        _host.place(mapping, missing, "host tier (G2)", strict=True)


@given(
    domain=st.integers(min_value=0, max_value=0xFFFF),
    bus=st.integers(min_value=0, max_value=0xFF),
    dev=st.integers(min_value=0, max_value=0x1F),
    fn=st.integers(min_value=0, max_value=7),
    wide=st.booleans(),
    upper=st.booleans(),
)
def test_cuda_pci_bus_ids_map_to_sysfs_names(domain: int, bus: int, dev: int, fn: int, wide: bool, upper: bool) -> None:
    cuda_id = f"{domain:08x}:{bus:02x}:{dev:02x}.{fn}" if wide else f"{domain:04x}:{bus:02x}:{dev:02x}.{fn}"
    if upper:
        cuda_id = cuda_id.upper()
    assert _host.sysfs_pci_name(cuda_id) == f"{domain:04x}:{bus:02x}:{dev:02x}.{fn}"


def test_a_gpu_numa_node_is_read_from_sysfs(tmp_path: Path) -> None:
    (tmp_path / "0000:1b:00.0").mkdir()
    (tmp_path / "0000:1b:00.0" / "numa_node").write_text("1\n")
    (tmp_path / "0000:2c:00.0").mkdir()
    (tmp_path / "0000:2c:00.0" / "numa_node").write_text("-1\n")
    assert _host.pci_numa_node("0000:1b:00.0", tmp_path) == 1
    assert _host.pci_numa_node("0000:2c:00.0", tmp_path) is None  # the platform does not say
    assert _host.pci_numa_node("0000:3d:00.0", tmp_path) is None


def test_numa_nodes_are_counted_from_sysfs(tmp_path: Path) -> None:
    for name in ("node0", "node1", "possible", "online"):
        (tmp_path / name).mkdir()
    assert _host.numa_node_count(tmp_path) == 2
    assert _host.numa_node_count(tmp_path / "missing") == 1
    assert _host.numa_node_count() >= 1


# --- the tier without CUDA ------------------------------------------------------------------------------


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA: see test_storage_gpu.py")
def test_without_cuda_a_pinned_tier_says_why_and_points_at_the_system_allocator() -> None:
    with pytest.raises(GpuUnavailableError) as caught:
        allocate(PinnedAllocator(), MiB)
    message = str(caught.value)
    assert message.startswith("host tier (G2): CUDA cannot be used: ")
    assert "SystemAllocator()" in message and '{"kind": "system"}' in message
    assert isinstance(caught.value, AllocationError)


def test_tuning_is_checked_like_a_config() -> None:
    with pytest.raises(ConfigError) as caught:
        PinTuning(populate_chunk_bytes=0, transparent_huge_pages="yes")  # type: ignore[arg-type]
    assert [path for path, _ in caught.value.errors] == ["tuning.populate_chunk_bytes", "tuning.transparent_huge_pages"]


def test_a_pinned_size_must_be_positive() -> None:
    with pytest.raises(KvbmError, match=r"host tier \(G2\): size must be a positive number of bytes"):
        allocate_pinned(0, PinnedAllocator())
