"""Moving blocks between host memory and disk with a TransferEngine: every layout pair, random data, shuffled
block ids, bytes compared after a round trip; batches, listeners, futures; and every failure surfaces as a
TransferError on the waiter, with nothing left hanging (threads, descriptors, buffers)."""

from __future__ import annotations

import asyncio
import errno
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm_builder import CancellationToken, ConfigError, FullyContiguous, LayerSeparate, StorageKind, Tier
from kvbm_builder.layout import Layout
from kvbm_builder.transfer import TransferEngine, TransferError, TransferFuture, TransferRecord
from tests.transfer_helpers import (
    LAYOUT_IDS,
    LAYOUT_TYPES,
    allocate,
    assert_same_blocks,
    block_bytes,
    close_layout,
    engine_threads,
    fill_random,
    make_spec,
    no_leaks,
)

SYSTEM, DISK = StorageKind.SYSTEM, StorageKind.DISK
MiB = 2**20


@pytest.fixture
def layouts(tmp_path: Path) -> Iterator[list[Layout]]:
    """Layouts made by a test, closed after it (and the directory checked empty: no file left behind)."""
    made: list[Layout] = []
    yield made
    for layout in made:
        close_layout(layout)
    assert list(tmp_path.iterdir()) == []


def new(made: list[Layout], spec_args: dict[str, object], kind: StorageKind, directory: Path, **kw: bool) -> Layout:
    layout = allocate(make_spec(**spec_args), kind, directory, **kw)  # type: ignore[arg-type]
    made.append(layout)
    return layout


# --- every path, every layout pair -------------------------------------------------------------------------

round_trips = st.fixed_dictionaries(
    {
        "types": st.tuples(*[st.sampled_from(range(3))] * 3),
        "alignments": st.tuples(*[st.sampled_from([1, 64, 4096])] * 3),
        "shape": st.sampled_from(
            [
                {"num_layers": 2, "outer_dim": 2, "page_size": 4, "inner_dim": 24, "dtype_width_bytes": 2},
                {"num_layers": 3, "outer_dim": 1, "page_size": 3, "inner_dim": 7, "dtype_width_bytes": 1},  # odd
                {"num_layers": 2, "outer_dim": 2, "page_size": 16, "inner_dim": 128, "dtype_width_bytes": 2},  # 4 KiB
            ]
        ),
        "blocks": st.integers(1, 12),
        "batch": st.integers(1, 5),
        "seed": st.integers(0, 2**32 - 1),
        "o_direct": st.booleans(),
    }
)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=round_trips)
def test_host_to_disk_to_host_round_trips_for_any_layouts(tmp_path: Path, case: dict) -> None:  # type: ignore[type-arg]
    rng = np.random.default_rng(case["seed"])
    n = case["blocks"]
    made: list[Layout] = []
    try:
        specs = [
            {"layout_type": LAYOUT_TYPES[t], "num_blocks": n + extra, "alignment": a, **case["shape"]}
            for t, a, extra in zip(case["types"], case["alignments"], (3, 5, 2), strict=True)
        ]
        host = new(made, specs[0], SYSTEM, tmp_path)
        disk = new(made, specs[1], DISK, tmp_path, o_direct=case["o_direct"])
        back = new(made, specs[2], SYSTEM, tmp_path)
        fill_random(host, rng)
        fill_random(disk, rng)
        h_ids, d_ids, b_ids = (rng.permutation(layout.spec.num_blocks)[:n] for layout in (host, disk, back))

        with no_leaks(), TransferEngine(max_batch_blocks=case["batch"]) as engine:
            offload = engine.copy(host, h_ids, disk, d_ids)
            onboard = engine.copy(disk, d_ids, back, b_ids)

        assert_same_blocks(host, h_ids, disk, d_ids)
        assert_same_blocks(host, h_ids, back, b_ids)
        assert (offload.src_tier, offload.dst_tier, offload.method) == (Tier.G2, Tier.G3, "io")
        assert (onboard.src_kind, onboard.dst_kind, onboard.num_blocks) == (DISK, SYSTEM, n)
    finally:
        for layout in made:
            close_layout(layout)


@pytest.mark.parametrize("dst_type", range(3), ids=LAYOUT_IDS)
@pytest.mark.parametrize("src_type", range(3), ids=LAYOUT_IDS)
def test_host_to_host_moves_shuffled_blocks_between_any_layouts(
    layouts: list[Layout], tmp_path: Path, src_type: int, dst_type: int
) -> None:
    rng = np.random.default_rng(src_type * 3 + dst_type)
    src = new(layouts, {"layout_type": LAYOUT_TYPES[src_type], "num_blocks": 20, "alignment": 256}, SYSTEM, tmp_path)
    dst = new(layouts, {"layout_type": LAYOUT_TYPES[dst_type], "num_blocks": 17}, SYSTEM, tmp_path)
    fill_random(src, rng)
    s_ids, d_ids = rng.permutation(20)[:15], rng.permutation(17)[:15]
    untouched = [b for b in range(17) if b not in set(d_ids.tolist())]
    before = {b: block_bytes(dst, b) for b in untouched}

    with TransferEngine(max_batch_blocks=4) as engine:
        record = engine.copy(src, s_ids, dst, d_ids)

    assert_same_blocks(src, s_ids, dst, d_ids)
    assert {b: block_bytes(dst, b) for b in untouched} == before  # nothing else written
    assert (record.method, record.num_blocks, record.ok) == ("host", 15, True)
    assert record.nbytes == 15 * src.spec.num_layers * src.spec.outer_dim * src.spec.region_bytes


@pytest.mark.parametrize("o_direct", [True, False], ids=["o_direct", "buffered"])
def test_disk_to_disk_goes_through_a_host_buffer(layouts: list[Layout], tmp_path: Path, o_direct: bool) -> None:
    rng = np.random.default_rng(7)
    src = new(layouts, {"layout_type": LayerSeparate(True), "num_blocks": 9}, DISK, tmp_path, o_direct=o_direct)
    dst = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 9, "alignment": 4096}, DISK, tmp_path)
    fill_random(src, rng)
    s_ids, d_ids = rng.permutation(9), rng.permutation(9)

    with no_leaks(), TransferEngine(max_batch_blocks=4, staging_bytes=3000) as engine:  # 1 block per chunk
        record = engine.copy(src, s_ids, dst, d_ids)
        assert engine.staging_bytes_held > 0

    assert_same_blocks(src, s_ids, dst, d_ids)
    assert record.method == "staged"
    assert engine.staging_bytes_held == 0


def test_large_aligned_blocks_go_to_disk_and_back_direct(layouts: list[Layout], tmp_path: Path) -> None:
    """Blocks of 1 MiB in 64 KiB regions, all 4096-aligned: the O_DIRECT path without any bounce."""
    rng = np.random.default_rng(3)
    shape = {"num_layers": 8, "outer_dim": 2, "page_size": 16, "inner_dim": 1024, "dtype_width_bytes": 2}
    host = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 24, **shape}, SYSTEM, tmp_path)
    disk = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 32, **shape}, DISK, tmp_path)
    back = new(layouts, {"layout_type": LayerSeparate(True), "num_blocks": 24, **shape}, SYSTEM, tmp_path)
    fill_random(host, rng)
    h_ids, d_ids, b_ids = rng.permutation(24)[:20], rng.permutation(32)[:20], rng.permutation(24)[:20]

    with TransferEngine() as engine:
        engine.copy(host, h_ids, disk, d_ids)
        engine.copy(disk, d_ids, back, b_ids)

    assert_same_blocks(host, h_ids, back, b_ids)


# --- batches, futures, listeners ----------------------------------------------------------------------------


def test_a_submit_is_split_into_batches_and_reported_once(layouts: list[Layout], tmp_path: Path) -> None:
    src = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 10}, SYSTEM, tmp_path)
    dst = new(layouts, {"layout_type": LayerSeparate(False), "num_blocks": 10}, DISK, tmp_path)
    fill_random(src, np.random.default_rng(0))
    records: list[TransferRecord] = []

    with TransferEngine(max_batch_blocks=3, max_concurrent=2, listeners=[records.append]) as engine:
        future = engine.submit(src, range(10), dst, list(reversed(range(10))))
        record = future.result(timeout=60)

    assert isinstance(future, TransferFuture)
    assert records == [record]
    assert (record.num_blocks, record.error, record.src_tier, record.dst_tier) == (10, None, Tier.G2, Tier.G3)
    assert record.seconds > 0
    assert_same_blocks(src, range(10), dst, reversed(range(10)))


def test_a_future_can_be_awaited(layouts: list[Layout], tmp_path: Path) -> None:
    src = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, SYSTEM, tmp_path)
    dst = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, DISK, tmp_path)
    fill_random(src, np.random.default_rng(1))

    async def offload(engine: TransferEngine) -> TransferRecord:
        return await engine.submit(src, [0, 1, 2, 3], dst, [3, 2, 1, 0])

    with TransferEngine() as engine:
        record = asyncio.run(offload(engine))

    assert record.ok and record.num_blocks == 4
    assert_same_blocks(src, [0, 1, 2, 3], dst, [3, 2, 1, 0])


def test_many_submits_from_many_threads_all_land(layouts: list[Layout], tmp_path: Path) -> None:
    src = new(layouts, {"layout_type": LayerSeparate(True), "num_blocks": 64}, SYSTEM, tmp_path)
    dst = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 64}, DISK, tmp_path)
    fill_random(src, np.random.default_rng(2))
    targets = np.random.default_rng(3).permutation(64)
    futures: list[TransferFuture] = []
    lock = threading.Lock()

    with TransferEngine(max_batch_blocks=2, max_concurrent=3) as engine:

        def worker(part: int) -> None:
            ids = list(range(part * 8, part * 8 + 8))
            future = engine.submit(src, ids, dst, targets[ids])
            with lock:
                futures.append(future)

        threads = [threading.Thread(target=worker, args=(part,)) for part in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        records = [f.result(timeout=60) for f in futures]

    assert sum(r.num_blocks for r in records) == 64
    assert_same_blocks(src, range(64), dst, targets)


def test_no_blocks_completes_at_once(layouts: list[Layout], tmp_path: Path) -> None:
    src = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 2}, SYSTEM, tmp_path)

    with TransferEngine() as engine:
        record = engine.copy(src, [], src, [])

    assert (record.num_blocks, record.nbytes, record.ok) == (0, 0, True)


def test_a_listener_that_raises_does_not_break_the_engine(layouts: list[Layout], tmp_path: Path) -> None:
    src = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, SYSTEM, tmp_path)
    dst = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, SYSTEM, tmp_path)
    seen: list[TransferRecord] = []

    def bad(record: TransferRecord) -> None:
        raise RuntimeError("listener bug")

    with TransferEngine(listeners=[bad]) as engine:
        engine.add_listener(seen.append)
        first = engine.copy(src, [0, 1], dst, [1, 0])
        second = engine.copy(src, [2], dst, [2])

    assert seen == [first, second]


def test_engine_settings_come_from_the_environment() -> None:
    environ = {"DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "7", "DYN_KVBM_MAX_CONCURRENT_TRANSFERS": "2"}

    with TransferEngine.from_env(environ) as engine:
        assert (engine.max_batch_blocks, engine.max_concurrent) == (7, 2)
    with TransferEngine.from_env({}) as engine:
        assert (engine.max_batch_blocks, engine.max_concurrent) == (16, 4)
    with pytest.raises(ConfigError, match="DYN_KVBM_MAX_TRANSFER_BATCH_SIZE"):
        TransferEngine.from_env({"DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "lots"})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_batch_blocks": 0}, "max_batch_blocks"),
        ({"max_concurrent": True}, "max_concurrent"),
        ({"device_copy": "dma"}, "device_copy"),
        ({"device_id": -1}, "device_id"),
        ({"cancellation_token": object()}, "cancellation_token"),
    ],
)
def test_bad_engine_arguments_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TransferEngine(**kwargs)  # type: ignore[arg-type]

    assert [path for path, _ in caught.value.errors] == [f"TransferEngine.{field}"]


def test_importing_the_package_imports_neither_numpy_nor_cupy() -> None:
    code = "import sys, kvbm_builder.transfer; print(sorted(m for m in sys.modules if m in ('numpy', 'cupy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)

    assert out.stdout.strip() == "[]"


# --- failures ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [True, False], ids=["direct", "bounced"])
def test_a_truncated_file_fails_the_read_naming_tiers_blocks_and_step(
    layouts: list[Layout], tmp_path: Path, aligned: bool
) -> None:
    shape = {"page_size": 16, "inner_dim": 128} if aligned else {}  # 4 KiB regions, or 192 bytes
    disk = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 8, **shape}, DISK, tmp_path)
    host = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 8, **shape}, SYSTEM, tmp_path)
    records: list[TransferRecord] = []
    storage = disk.storages[0]
    os.truncate(storage.path, 4096)  # type: ignore[attr-defined]  # blocks past the first 4 KiB are gone

    with no_leaks(), TransferEngine(max_batch_blocks=2, listeners=[records.append]) as engine:
        future = engine.submit(disk, [0, 7, 3], host, [1, 2, 3])
        with pytest.raises(TransferError) as caught:
            future.result(timeout=60)

    error = caught.value
    assert (error.src_tier, error.dst_tier, error.step) == (Tier.G3, Tier.G2, "read disk")
    assert (error.src_blocks, error.dst_blocks) == ((0, 7, 3), (1, 2, 3))
    assert "end of file" in str(error) and storage.path in str(error)  # type: ignore[attr-defined]
    assert [r.error for r in records] == [error]


def test_a_write_error_fails_the_offload(layouts: list[Layout], tmp_path: Path) -> None:
    host = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, SYSTEM, tmp_path)
    disk = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, DISK, tmp_path, o_direct=False)
    storage = disk.storages[0]
    read_only = os.open(storage.path, os.O_RDONLY)  # type: ignore[attr-defined]
    os.dup2(read_only, storage.fd)  # type: ignore[attr-defined]  # the storage's descriptor now refuses writes
    os.close(read_only)

    with TransferEngine() as engine, pytest.raises(TransferError) as caught:
        engine.copy(host, [0, 1], disk, [2, 3])

    assert caught.value.step == "write disk"
    assert "EBADF" in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.EBADF


def test_a_disk_storage_whose_fd_was_closed_is_refused_at_submit(layouts: list[Layout], tmp_path: Path) -> None:
    host = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, SYSTEM, tmp_path)
    disk = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, DISK, tmp_path)
    fd = disk.storages[0].fd  # type: ignore[attr-defined]
    os.close(fd)  # behind the storage's back

    try:
        with TransferEngine() as engine, pytest.raises(TransferError) as caught:
            engine.submit(host, [0], disk, [0])
    finally:
        occupy(fd)  # the storage's own close() must close a number nobody else was given meanwhile

    assert caught.value.step == "open disk"
    assert "is not open" in str(caught.value)
    assert engine_threads() == []


def occupy(fd: int) -> None:
    spare = os.open(os.devnull, os.O_RDONLY)
    if spare != fd:
        os.dup2(spare, fd)
        os.close(spare)


def test_a_closed_storage_is_refused_at_submit(layouts: list[Layout], tmp_path: Path) -> None:
    host = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, SYSTEM, tmp_path)
    other = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, SYSTEM, tmp_path)
    close_layout(other)

    with TransferEngine() as engine, pytest.raises(TransferError, match=r"target storage 0 .* is closed") as caught:
        engine.submit(host, [0], other, [0])

    assert caught.value.step == "validate"


def test_a_cancelled_token_refuses_new_transfers(layouts: list[Layout], tmp_path: Path) -> None:
    host = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, SYSTEM, tmp_path)
    token = CancellationToken()
    token.cancel()

    with TransferEngine(cancellation_token=token) as engine, pytest.raises(TransferError) as caught:
        engine.submit(host, [0], host, [1])

    assert caught.value.step == "cancelled"


def test_cancelling_fails_the_batches_not_started(layouts: list[Layout], tmp_path: Path) -> None:
    src = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 32}, SYSTEM, tmp_path)
    dst = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 32}, DISK, tmp_path)
    token = CancellationToken()
    records: list[TransferRecord] = []

    submitted = threading.Event()

    def cancel_after_first(record: TransferRecord) -> None:
        records.append(record)
        submitted.wait(30)  # the second submit is queued before the token goes
        token.cancel()

    with no_leaks(), TransferEngine(max_batch_blocks=1, max_concurrent=1, cancellation_token=token) as engine:
        engine.add_listener(cancel_after_first)
        first = engine.submit(src, [0], dst, [0])
        second = engine.submit(src, range(1, 32), dst, range(1, 32))  # waits behind the first
        submitted.set()
        assert first.result(timeout=60).ok
        with pytest.raises(TransferError) as caught:
            second.result(timeout=60)

    assert caught.value.step == "cancelled"
    assert caught.value.dst_blocks == tuple(range(1, 32))
    assert [r.error is None for r in records] == [True, False]


def test_close_from_a_listener_fails_what_has_not_started(layouts: list[Layout], tmp_path: Path) -> None:
    src = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 32}, SYSTEM, tmp_path)
    dst = new(layouts, {"layout_type": LayerSeparate(True), "num_blocks": 32}, SYSTEM, tmp_path)

    with no_leaks():
        engine = TransferEngine(max_batch_blocks=1, max_concurrent=1)
        submitted = threading.Event()

        def close_after_first(record: TransferRecord) -> None:
            submitted.wait(30)  # the second submit is queued before the engine closes
            engine.close()

        engine.add_listener(close_after_first)
        first = engine.submit(src, [0], dst, [0])
        second = engine.submit(src, range(1, 32), dst, range(1, 32))
        submitted.set()
        with pytest.raises(TransferError) as caught:
            second.result(timeout=60)
        engine.close()

    assert first.result().ok
    assert caught.value.step == "closed"
    with pytest.raises(TransferError, match="closed") as refused:
        engine.submit(src, [0], dst, [0])
    assert refused.value.step == "closed"


def test_close_during_a_large_transfer_never_hangs_or_reports_a_partial_copy(
    layouts: list[Layout], tmp_path: Path
) -> None:
    shape = {"num_layers": 4, "outer_dim": 2, "page_size": 16, "inner_dim": 512, "dtype_width_bytes": 2}
    src = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 128, **shape}, SYSTEM, tmp_path)
    dst = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 128, **shape}, DISK, tmp_path)
    fill_random(src, np.random.default_rng(4))

    with no_leaks():
        engine = TransferEngine(max_batch_blocks=1, max_concurrent=2)
        future = engine.submit(src, range(128), dst, np.random.default_rng(5).permutation(128))
        engine.close()
        assert future.done()  # close() waited for what was in flight

    error = future.exception()
    if error is None:  # the whole copy finished before close() took effect: then it must be right
        assert_same_blocks(src, range(128), dst, np.random.default_rng(5).permutation(128))
    else:
        assert isinstance(error, TransferError) and error.step == "closed"


def test_layouts_of_another_model_are_refused_at_submit(layouts: list[Layout], tmp_path: Path) -> None:
    src = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4}, SYSTEM, tmp_path)
    dst = new(layouts, {"layout_type": FullyContiguous(), "num_blocks": 4, "num_layers": 5}, DISK, tmp_path)

    with TransferEngine() as engine, pytest.raises(TransferError, match="differ in num_layers") as caught:
        engine.submit(src, [0], dst, [0])

    assert (caught.value.step, caught.value.src_tier, caught.value.dst_tier) == ("validate", Tier.G2, Tier.G3)


def test_errors_and_records_survive_pickling() -> None:
    error = TransferError("x", src_tier=Tier.G1, dst_tier=Tier.G2, src_blocks=[1], dst_blocks=[2], step="copy kernel")

    copy = pickle.loads(pickle.dumps(error))

    assert (str(copy), copy.src_tier, copy.dst_tier, copy.src_blocks, copy.dst_blocks, copy.step) == (
        "x",
        Tier.G1,
        Tier.G2,
        (1,),
        (2,),
        "copy kernel",
    )


def test_close_is_idempotent_and_leaves_no_thread() -> None:
    engine = TransferEngine()
    engine.close()
    engine.close()

    assert engine.closed and engine_threads() == []
