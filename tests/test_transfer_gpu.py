"""Moving blocks to and from GPU memory with a TransferEngine, on a real GPU: every layout pair and every copy
method (kernel, memcpy, bounce), pinned, pageable (staged) and disk (staged) host sides, random data and shuffled
block ids, bytes compared after a round trip; and failures that surface as TransferErrors with nothing left behind.

Skipped, with the reason, where no CUDA device is visible (tests/conftest.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest

from kvbm_builder import CancellationToken, FullyContiguous, LayerSeparate, StorageKind, Tier
from kvbm_builder.layout import Layout
from kvbm_builder.transfer import KernelConfig, TransferEngine, TransferError, TransferRecord
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

pytestmark = pytest.mark.gpu

DEVICE, PINNED, SYSTEM, DISK = StorageKind.DEVICE, StorageKind.PINNED, StorageKind.SYSTEM, StorageKind.DISK
SHAPES = {
    "r192": {"num_layers": 3, "outer_dim": 2, "page_size": 4, "inner_dim": 24, "dtype_width_bytes": 2},
    "r21": {"num_layers": 2, "outer_dim": 2, "page_size": 3, "inner_dim": 7, "dtype_width_bytes": 1},  # byte copies
    "r100k": {"num_layers": 2, "outer_dim": 2, "page_size": 25, "inner_dim": 1024, "dtype_width_bytes": 4},  # pieces
}


@pytest.fixture
def layouts(tmp_path: Path) -> Iterator[list[Layout]]:
    made: list[Layout] = []
    yield made
    for layout in made:
        close_layout(layout)
    assert list(tmp_path.iterdir()) == []


def new(made: list[Layout], kind: StorageKind, directory: Path, **spec: Any) -> Layout:
    layout = allocate(make_spec(**spec), kind, directory)
    made.append(layout)
    return layout


def round_trip(
    engine: TransferEngine, device: Layout, host: Layout, back: Layout, rng: np.random.Generator, n: int
) -> tuple[TransferRecord, TransferRecord]:
    """device -> host -> back (a second device layout): bytes checked at each step."""
    fill_random(device, rng)
    fill_random(host, rng)
    fill_random(back, rng)
    d_ids, h_ids, b_ids = (rng.permutation(layout.spec.num_blocks)[:n] for layout in (device, host, back))
    offload = engine.copy(device, d_ids, host, h_ids)
    assert_same_blocks(device, d_ids, host, h_ids)
    onboard = engine.copy(host, h_ids, back, b_ids)
    assert_same_blocks(device, d_ids, back, b_ids)
    return offload, onboard


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", ["auto", "kernel", "table", "memcpy", "bounce"])
@pytest.mark.parametrize("host_type", range(3), ids=LAYOUT_IDS)
@pytest.mark.parametrize("device_type", range(3), ids=LAYOUT_IDS)
def test_device_to_pinned_and_back_for_every_layout_pair_and_method(
    layouts: list[Layout], tmp_path: Path, device_type: int, host_type: int, method: str, shape: str
) -> None:
    rng = np.random.default_rng(hash((device_type, host_type, method, shape)) % 2**32)
    dims = SHAPES[shape]
    device = new(layouts, DEVICE, tmp_path, layout_type=LAYOUT_TYPES[device_type], num_blocks=14, alignment=256, **dims)
    host = new(layouts, PINNED, tmp_path, layout_type=LAYOUT_TYPES[host_type], num_blocks=12, alignment=4096, **dims)
    back = new(layouts, DEVICE, tmp_path, layout_type=LAYOUT_TYPES[host_type], num_blocks=11, **dims)
    kernel = KernelConfig(bounce_bytes=5000)  # bounce: many chunks even for small blocks

    with TransferEngine(max_batch_blocks=4, device_copy=method, kernel=kernel) as engine:
        offload, onboard = round_trip(engine, device, host, back, rng, n=10)

    assert (offload.src_tier, offload.dst_tier, onboard.src_tier, onboard.dst_tier) == (
        Tier.G1,
        Tier.G2,
        Tier.G2,
        Tier.G1,
    )
    if method != "auto":  # bounce needs whole host blocks (FullyContiguous); elsewhere the kernel goes
        expected = "kernel" if method == "bounce" and host_type != 0 else method
        assert offload.method == onboard.method == expected


@pytest.mark.parametrize(
    "kernel",
    [
        KernelConfig(table_on_device=False),
        KernelConfig(max_grid=3, threads=128, unroll=1),
        KernelConfig(piece_bytes=4096, threads=512, unroll=8),
    ],
    ids=["table-in-pinned-memory", "grid-stride", "small-pieces"],
)
def test_kernel_variants_move_the_same_bytes(layouts: list[Layout], tmp_path: Path, kernel: KernelConfig) -> None:
    rng = np.random.default_rng(11)
    dims = SHAPES["r100k"]
    device = new(layouts, DEVICE, tmp_path, layout_type=LayerSeparate(True), num_blocks=12, **dims)
    host = new(layouts, PINNED, tmp_path, layout_type=FullyContiguous(), num_blocks=12, **dims)
    back = new(layouts, DEVICE, tmp_path, layout_type=LayerSeparate(False), num_blocks=12, alignment=512, **dims)

    for method in ("kernel", "table", "bounce"):
        with TransferEngine(device_copy=method, kernel=kernel) as engine:
            round_trip(engine, device, host, back, rng, n=12)


@pytest.mark.parametrize("method", ["kernel", "table", "memcpy"])
@pytest.mark.parametrize("dst_type", range(3), ids=LAYOUT_IDS)
@pytest.mark.parametrize("src_type", range(3), ids=LAYOUT_IDS)
def test_device_to_device_for_every_layout_pair(
    layouts: list[Layout], tmp_path: Path, src_type: int, dst_type: int, method: str
) -> None:
    rng = np.random.default_rng(src_type * 3 + dst_type)
    src = new(layouts, DEVICE, tmp_path, layout_type=LAYOUT_TYPES[src_type], num_blocks=9, alignment=64)
    dst = new(layouts, DEVICE, tmp_path, layout_type=LAYOUT_TYPES[dst_type], num_blocks=13)
    fill_random(src, rng)
    s_ids, d_ids = rng.permutation(9), rng.permutation(13)[:9]

    with TransferEngine(device_copy=method) as engine:
        record = engine.copy(src, s_ids, dst, d_ids)

    assert_same_blocks(src, s_ids, dst, d_ids)
    assert (record.src_tier, record.dst_tier, record.method) == (Tier.G1, Tier.G1, method)


@pytest.mark.parametrize("shape", ["r192", "r21", "r100k"])
@pytest.mark.parametrize("host_kind", [SYSTEM, DISK], ids=["system", "disk"])
@pytest.mark.parametrize("host_type", range(3), ids=LAYOUT_IDS)
@pytest.mark.parametrize("device_type", range(3), ids=LAYOUT_IDS)
def test_device_to_pageable_memory_and_disk_go_through_staging(
    layouts: list[Layout], tmp_path: Path, device_type: int, host_type: int, host_kind: StorageKind, shape: str
) -> None:
    rng = np.random.default_rng(hash((device_type, host_type, host_kind.value, shape)) % 2**32)
    dims = SHAPES[shape]
    device = new(layouts, DEVICE, tmp_path, layout_type=LAYOUT_TYPES[device_type], num_blocks=14, alignment=256, **dims)
    host = new(layouts, host_kind, tmp_path, layout_type=LAYOUT_TYPES[host_type], num_blocks=12, alignment=4096, **dims)
    back = new(layouts, DEVICE, tmp_path, layout_type=LAYOUT_TYPES[(host_type + 1) % 3], num_blocks=11, **dims)
    staging = 3 * make_spec(layout_type=FullyContiguous(), num_blocks=1, alignment=4096, **dims).block_stride

    with no_leaks(), TransferEngine(max_batch_blocks=7, staging_bytes=staging) as engine:  # 3 blocks per chunk
        offload, onboard = round_trip(engine, device, host, back, rng, n=10)
        assert engine.staging_bytes_held > 0

    assert offload.method == onboard.method == "staged"
    assert (offload.dst_kind, onboard.src_kind) == (host_kind, host_kind)
    assert engine.staging_bytes_held == 0


def test_auto_sends_large_runs_by_dma_and_scattered_regions_by_the_kernel(
    layouts: list[Layout], tmp_path: Path
) -> None:
    dims = {"num_layers": 4, "outer_dim": 2, "page_size": 64, "inner_dim": 1024, "dtype_width_bytes": 2}  # 1 MiB
    fc = new(layouts, DEVICE, tmp_path, layout_type=FullyContiguous(), num_blocks=8, **dims)
    ls = new(layouts, DEVICE, tmp_path, layout_type=LayerSeparate(True), num_blocks=8, **dims)
    host = new(layouts, PINNED, tmp_path, layout_type=FullyContiguous(), num_blocks=8, **dims)
    rng = np.random.default_rng(5)
    fill_random(fc, rng)
    fill_random(ls, rng)

    with TransferEngine() as engine:
        whole_blocks = engine.copy(fc, [0, 2, 4], host, [5, 3, 1])
        assert_same_blocks(fc, [0, 2, 4], host, [5, 3, 1])
        regions = engine.copy(ls, [0, 2, 4], host, [5, 3, 1])
        assert_same_blocks(ls, [0, 2, 4], host, [5, 3, 1])

    assert whole_blocks.method == "memcpy"
    assert regions.method in ("kernel", "bounce")
    assert (whole_blocks.src_kind, regions.dst_kind) == (DEVICE, PINNED)


def test_many_batches_in_flight_on_every_stream(layouts: list[Layout], tmp_path: Path) -> None:
    dims = {"num_layers": 4, "outer_dim": 2, "page_size": 16, "inner_dim": 256, "dtype_width_bytes": 2}
    device = new(layouts, DEVICE, tmp_path, layout_type=LayerSeparate(True), num_blocks=256, **dims)
    host = new(layouts, PINNED, tmp_path, layout_type=FullyContiguous(), num_blocks=256, **dims)
    rng = np.random.default_rng(6)
    fill_random(device, rng)
    d_ids, h_ids = rng.permutation(256), rng.permutation(256)

    with TransferEngine(max_batch_blocks=3, max_concurrent=4) as engine:
        futures = [engine.submit(device, d_ids[i : i + 32], host, h_ids[i : i + 32]) for i in range(0, 256, 32)]
        assert all(f.result(timeout=60).ok for f in futures)

    assert_same_blocks(device, d_ids, host, h_ids)


def test_a_disk_write_in_flight_never_holds_the_slot_a_gpu_copy_needs(layouts: list[Layout], tmp_path: Path) -> None:
    dims = {"num_layers": 4, "outer_dim": 2, "page_size": 64, "inner_dim": 1024, "dtype_width_bytes": 2}  # 1 MiB
    host = new(layouts, PINNED, tmp_path, layout_type=FullyContiguous(), num_blocks=512, **dims)
    disk = new(layouts, DISK, tmp_path, layout_type=FullyContiguous(), num_blocks=512, **dims)
    device = new(layouts, DEVICE, tmp_path, layout_type=LayerSeparate(True), num_blocks=4, **dims)
    rng = np.random.default_rng(9)
    fill_random(device, rng)

    # one slot per lane: the disk write (508 MiB, hundreds of milliseconds) holds the host/disk lane's only slot
    with TransferEngine(max_batch_blocks=512, max_concurrent=1) as engine:
        engine.prepare_gpu()
        writing = engine.submit(host, range(508), disk, range(508))
        copied = engine.submit(device, [0, 1, 2, 3], host, [511, 510, 509, 508])  # blocks the write does not read
        assert copied.result(timeout=60).ok
        assert not writing.done()  # the GPU copy went past it: it did not wait for the disk lane's slot
        assert writing.result(timeout=120).ok

    assert_same_blocks(device, [0, 1, 2, 3], host, [511, 510, 509, 508])


# --- failures ------------------------------------------------------------------------------------------------


@attrs.frozen
class Relabelled:
    """Memory that claims to be another kind than it is (what a buggy allocator could hand the engine)."""

    addr: int
    size: int
    kind: StorageKind
    device_id: int = 0


def test_pageable_memory_labelled_pinned_is_refused_before_any_copy(layouts: list[Layout], tmp_path: Path) -> None:
    device = new(layouts, DEVICE, tmp_path, layout_type=FullyContiguous(), num_blocks=4)
    system = new(layouts, SYSTEM, tmp_path, layout_type=FullyContiguous(), num_blocks=4)
    storage = system.storages[0]
    fake = Layout(system.spec, [Relabelled(storage.addr, storage.size, PINNED)])

    with TransferEngine() as engine, pytest.raises(TransferError) as caught:
        engine.submit(device, [0, 1], fake, [2, 3])

    assert caught.value.step == "check memory"
    assert "not page-locked" in str(caught.value)
    assert (caught.value.src_tier, caught.value.dst_tier) == (Tier.G1, Tier.G2)


def test_host_memory_labelled_device_is_refused_before_any_copy(layouts: list[Layout], tmp_path: Path) -> None:
    pinned = new(layouts, PINNED, tmp_path, layout_type=FullyContiguous(), num_blocks=4)
    storage = pinned.storages[0]
    fake = Layout(pinned.spec, [Relabelled(storage.addr, storage.size, DEVICE)])

    with TransferEngine() as engine, pytest.raises(TransferError, match="is not memory of GPU 0") as caught:
        engine.submit(pinned, [0], fake, [1])

    assert caught.value.step == "check memory"


def test_a_closed_device_storage_is_refused(layouts: list[Layout], tmp_path: Path) -> None:
    device = new(layouts, DEVICE, tmp_path, layout_type=FullyContiguous(), num_blocks=4)
    pinned = new(layouts, PINNED, tmp_path, layout_type=FullyContiguous(), num_blocks=4)
    close_layout(device)

    with TransferEngine() as engine, pytest.raises(TransferError, match="is closed") as caught:
        engine.submit(device, [0], pinned, [0])

    assert caught.value.step == "validate"


def test_a_cancelled_token_fails_device_batches_not_started(layouts: list[Layout], tmp_path: Path) -> None:
    device = new(layouts, DEVICE, tmp_path, layout_type=LayerSeparate(True), num_blocks=64)
    pinned = new(layouts, PINNED, tmp_path, layout_type=FullyContiguous(), num_blocks=64)
    token = CancellationToken()
    engine = TransferEngine(max_batch_blocks=1, max_concurrent=1, cancellation_token=token)
    submitted = threading.Event()

    def cancel_after_first(record: TransferRecord) -> None:
        submitted.wait(30)  # the second submit is queued before the token goes
        token.cancel()

    engine.add_listener(cancel_after_first)
    with no_leaks():
        first = engine.submit(device, [0], pinned, [0])
        second = engine.submit(device, range(1, 64), pinned, range(1, 64))
        submitted.set()
        with pytest.raises(TransferError) as caught:
            second.result(timeout=60)
        engine.close()

    assert first.result().ok
    assert caught.value.step == "cancelled"


@pytest.mark.parametrize("host_kind", [PINNED, SYSTEM, DISK], ids=["pinned", "system", "disk"])
def test_close_during_a_large_device_transfer_never_hangs_or_reports_a_partial_copy(
    layouts: list[Layout], tmp_path: Path, host_kind: StorageKind
) -> None:
    dims = {"num_layers": 4, "outer_dim": 2, "page_size": 16, "inner_dim": 1024, "dtype_width_bytes": 2}
    device = new(layouts, DEVICE, tmp_path, layout_type=LayerSeparate(True), num_blocks=96, **dims)
    host = new(layouts, host_kind, tmp_path, layout_type=FullyContiguous(), num_blocks=96, **dims)
    fill_random(device, np.random.default_rng(8))
    targets = np.random.default_rng(9).permutation(96)

    with no_leaks():
        engine = TransferEngine(max_batch_blocks=2, max_concurrent=2)
        future = engine.submit(device, range(96), host, targets)
        engine.close()
        assert future.done()
        assert engine.staging_bytes_held == 0

    error = future.exception()
    if error is None:
        assert_same_blocks(device, range(96), host, targets)
    else:
        assert isinstance(error, TransferError) and error.step == "closed"
    assert engine_threads() == []


def test_a_block_never_touched_keeps_its_bytes(layouts: list[Layout], tmp_path: Path) -> None:
    """The copy writes exactly its target blocks: neighbours (padding-free, back to back) are left alone."""
    device = new(layouts, DEVICE, tmp_path, layout_type=LayerSeparate(True), num_blocks=16)
    pinned = new(layouts, PINNED, tmp_path, layout_type=FullyContiguous(), num_blocks=16)
    rng = np.random.default_rng(10)
    fill_random(device, rng)
    fill_random(pinned, rng)
    before = {b: block_bytes(pinned, b) for b in range(16)}

    with TransferEngine() as engine:
        for method in ("kernel", "bounce"):
            engine.device_copy = method
            engine.copy(device, [3, 4, 9], pinned, [10, 2, 7])

    assert_same_blocks(device, [3, 4, 9], pinned, [10, 2, 7])
    assert {b: block_bytes(pinned, b) for b in range(16) if b not in (10, 2, 7)} == {
        b: v for b, v in before.items() if b not in (10, 2, 7)
    }


@pytest.mark.parametrize("batched", [True, False], ids=["one-driver-call", "a-call-per-run"])
def test_the_copy_engine_moves_the_same_bytes_in_one_driver_call_or_one_call_per_run(
    layouts: list[Layout], tmp_path: Path, batched: bool
) -> None:
    dims = {"num_layers": 4, "outer_dim": 2, "page_size": 64, "inner_dim": 1024, "dtype_width_bytes": 2}  # 1 MiB
    device = new(layouts, DEVICE, tmp_path, layout_type=FullyContiguous(), num_blocks=24, **dims)
    ls = new(layouts, DEVICE, tmp_path, layout_type=LayerSeparate(True), num_blocks=24, **dims)
    host = new(layouts, PINNED, tmp_path, layout_type=FullyContiguous(), num_blocks=24, **dims)
    back = new(layouts, DEVICE, tmp_path, layout_type=FullyContiguous(), num_blocks=24, **dims)
    rng = np.random.default_rng(12)

    with TransferEngine(max_batch_blocks=8) as engine:
        engine.prepare_gpu()
        cuda = engine._cuda
        assert cuda is not None
        if batched and cuda.batch is None:
            pytest.skip("this driver has no cuMemcpyBatchAsync (CUDA 12.8+)")
        if not batched:
            cuda.batch = None
        offload, onboard = round_trip(engine, device, host, back, rng, n=20)  # three batches each way
        assert offload.method == onboard.method == "memcpy"
        fill_random(ls, rng)
        d_ids, h_ids = rng.permutation(24)[:20], rng.permutation(24)[:20]
        engine.device_copy = "bounce"  # the kernel gathers into GPU scratch, the copy engine moves whole blocks
        assert engine.copy(ls, d_ids, host, h_ids).method == "bounce"
        assert_same_blocks(ls, d_ids, host, h_ids)
        fill_random(ls, rng)
        assert engine.copy(host, h_ids, ls, d_ids).method == "bounce"
        assert_same_blocks(host, h_ids, ls, d_ids)
