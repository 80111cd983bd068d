"""What the manager adds to a transfer: ``offload_sync`` / ``onboard_sync`` against ``engine.copy`` of the same blocks.

For N = 16, 64, 256 registered blocks, in one run, the two alternating round by round:

- **manager**: ``manager.offload_sync(blocks)`` (the already-present check, the filter, target slots, queueing,
  engine submits, registration on completion, events, metrics) and ``manager.onboard_sync(blocks)`` back;
- **engine**: the manager's own transfer engine, ``engine.copy(src_layout, ids, dst_layout, ids)`` of the same
  blocks between the same layouts, into the target slots the manager used, with the same batch size (16) and
  concurrency (4): the bytes alone.

The difference is the manager's overhead: microseconds per block of wall time, and of CPU time (all the process's
threads; less disturbed by other processes on a shared machine), and manager / engine wall time.

- ``--cpu`` (the default without a GPU): a system-memory host tier (G2) and a disk tier (G3) of tiny blocks
  (2 layers x 2 x page 16 x inner 64 x 2 bytes = 8 KiB), 4096 blocks each, so that the I/O is small and the overhead
  shows; offload G2 -> G3, onboard G3 -> G2.
- ``--gpu`` (the default with one): issue 9's shape, 4 MiB blocks (32 layers x 2 x page 32 x inner 1024 x 2 bytes),
  device LayerSeparate(outer-contiguous) G1 <-> pinned FullyContiguous G2, 512 blocks each; offload G1 -> G2,
  onboard G2 -> G1; GB/s, and the fraction of the ceiling, one large pinned ``cudaMemcpyAsync`` of the same bytes
  each way measured in the same run. Then again with a disk tier (G3) behind the host tier: every block that reaches
  the host goes on to the disk (the cascade), which must not slow the G1 -> G2 waiter.

Median of the rounds after warm-up ones; between rounds, untimed, the copies the round made are evicted so that
every round copies every block (and the cascade to disk has finished).

    python benchmarks/bench_offload.py [--cpu | --gpu] [--disk-dir DIR] [--repeats R] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvbm_builder import (
    DeviceAllocator,
    DiskAllocator,
    FullyContiguous,
    KvBlockManager,
    KvBlockManagerConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    PinnedAllocator,
    SystemAllocator,
    Tier,
)
from kvbm_builder.config.settings import KvbmSettings

NS = (16, 64, 256)
CPU_MODEL = KvManagerModelConfig.builder().num_layers(2).outer_dim(2).page_size(16).inner_dim(64).build()
GPU_MODEL = KvManagerModelConfig.builder().num_layers(32).outer_dim(2).page_size(32).inner_dim(1024).build()
CPU_BLOCKS = 4096
GPU_BLOCKS = 512
WARMUP = 3

Round = Callable[[], tuple[float, float]]  # one timed round: (wall seconds, CPU seconds)


def block_bytes(model: KvManagerModelConfig) -> int:
    return model.num_layers * model.outer_dim * model.page_size * model.inner_dim * model.dtype_width_bytes


def tier(blocks: int, allocator: Any, layout: Any) -> Any:
    return KvManagerLayoutConfig.builder().num_blocks(blocks).allocator(allocator).layout_type(layout).build()


def build(
    model: KvManagerModelConfig, *, device: int = 0, host: int = 0, disk: int = 0, pinned: bool = False, directory: str
) -> KvBlockManager:
    config = (
        KvBlockManagerConfig.builder()
        .runtime(KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build())
        .model(model)
    )
    if device:
        config = config.device_layout(tier(device, DeviceAllocator(device_id=0), LayerSeparate(outer_contiguous=True)))
    if host:
        config = config.host_layout(tier(host, PinnedAllocator() if pinned else SystemAllocator(), FullyContiguous()))
    if disk:
        config = config.disk_layout(tier(disk, DiskAllocator(directory=directory), FullyContiguous()))
    # the default batch size and concurrency (16, 4); every block offered to the disk goes (no second sighting)
    return KvBlockManager(config.build(), settings=KvbmSettings(disk_offload_filter=False))


def fill(manager: KvBlockManager, where: Tier, count: int, first_token: int) -> list[Any]:
    """``count`` registered blocks of ``where`` (their bytes as allocated: only time is measured here)."""
    page = manager.config.model.page_size
    return manager.register(manager.allocate(where, count), tokens=range(first_token, first_token + count * page))


def release(blocks: list[Any]) -> None:
    for block in blocks:  # (untimed; one by one, so that the script also measures managers before the batch API)
        block.release()


def timed(call: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(rounds: int, ours: Round, theirs: Round) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (wall, CPU) seconds of the manager's and the engine's rounds, alternated so both see the same machine."""
    for _ in range(WARMUP):
        ours()
        theirs()
    mine, bare = [], []
    for _ in range(rounds):
        mine.append(ours())
        bare.append(theirs())

    def median(times: list[tuple[float, float]]) -> tuple[float, float]:
        return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)

    return median(mine), median(bare)


def evict_copies(manager: KvBlockManager, keep: Tier) -> None:
    manager.wait_idle()  # a cascade to disk is not part of the waiter's time, but must end before the next round
    for other in manager.tiers:
        if other is not keep:
            manager.pool(other).reset_inactive()


def offload_rounds(manager: KvBlockManager, held: list[Any], dst: Tier) -> tuple[Round, Round]:
    """A manager round (offload every block of ``held`` to ``dst``) and an engine round (the same source blocks to
    the target slots the manager's last round used)."""
    src = held[0].tier
    engine = manager.offload_manager.engine
    src_layout, dst_layout = manager.tier(src).layout, manager.tier(dst).layout
    assert src_layout is not None and dst_layout is not None
    src_ids = [b.block_id for b in held]
    hashes = [b.sequence_hash for b in held]
    dst_ids: list[int] = []

    def ours() -> tuple[float, float]:
        seconds = timed(lambda: manager.offload_sync(held))
        landed = manager.pool(dst).match(hashes)
        if len(landed) != len(held):
            raise SystemExit(f"the offload left {len(landed)} of {len(held)} blocks in the {dst.words}")
        dst_ids[:] = [b.block_id for b in landed]
        release(landed)
        evict_copies(manager, src)
        return seconds

    def theirs() -> tuple[float, float]:
        return timed(lambda: engine.copy(src_layout, src_ids, dst_layout, dst_ids))

    return ours, theirs


def onboard_rounds(manager: KvBlockManager, lower: list[Any], dst: Tier) -> tuple[Round, Round]:
    """A manager round (onboard ``lower`` into ``dst``, then evict the copies) and an engine round."""
    src = lower[0].tier
    engine = manager.offload_manager.engine
    src_layout, dst_layout = manager.tier(src).layout, manager.tier(dst).layout
    assert src_layout is not None and dst_layout is not None
    src_ids = [b.block_id for b in lower]
    dst_ids: list[int] = []

    def ours() -> tuple[float, float]:
        back: list[Any] = []
        seconds = timed(lambda: back.extend(manager.onboard_sync(lower, to=dst)))
        dst_ids[:] = [b.block_id for b in back]
        release(back)
        manager.pool(dst).reset_inactive()
        return seconds

    def theirs() -> tuple[float, float]:
        return timed(lambda: engine.copy(src_layout, src_ids, dst_layout, dst_ids))

    return ours, theirs


def both_ways(
    manager: KvBlockManager, top: Tier, lower: Tier, n: int, rounds: int, first_token: int
) -> dict[str, tuple[tuple[float, float], tuple[float, float]]]:
    """Offload ``n`` blocks of ``top`` to ``lower``, then onboard them back: (manager, engine) medians of each."""
    held = fill(manager, top, n, first_token)
    offload = measure(rounds, *offload_rounds(manager, held, lower))
    manager.offload_sync(held)  # in the lower tier for the onboard rounds
    evict_copies(manager, lower)
    hashes = [b.sequence_hash for b in held]
    release(held)
    manager.pool(top).reset_inactive()
    below = manager.pool(lower).match(hashes)
    onboard = measure(rounds, *onboard_rounds(manager, below, top))
    release(below)
    for each in manager.tiers:
        manager.pool(each).reset_inactive()
    return {"offload": offload, "onboard": onboard}


class Report:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def say(self, text: str) -> None:
        print(text, flush=True)

    def save(self, path: str | None, meta: dict[str, Any]) -> None:
        if path is not None:
            Path(path).write_text(json.dumps({**meta, "rows": self.rows}, indent=1) + "\n")


def run_cpu(args: argparse.Namespace, report: Report) -> None:
    report.say(
        f"CPU: system G2 <-> disk G3 ({args.disk_dir}), blocks of {block_bytes(CPU_MODEL) // 1024} KiB, "
        f"{CPU_BLOCKS} per tier, batches of 16, 4 in flight; median of {args.repeats} rounds after {WARMUP}"
    )
    report.say(
        f"{'N':>4} {'path':<8} {'manager':>9} {'engine':>9} {'ratio':>6} {'overhead/block':>15} "
        f"{'CPU overhead/block':>19}"
    )
    with build(CPU_MODEL, host=CPU_BLOCKS, disk=CPU_BLOCKS, directory=args.disk_dir) as manager:
        for n in NS:
            for path, (mine, bare) in both_ways(manager, Tier.G2, Tier.G3, n, args.repeats, n * 10**6).items():
                row = {
                    "mode": "cpu",
                    "n": n,
                    "path": path,
                    "manager_s": mine[0],
                    "engine_s": bare[0],
                    "manager_cpu_s": mine[1],
                    "engine_cpu_s": bare[1],
                    "overhead_us_per_block": (mine[0] - bare[0]) / n * 1e6,
                    "cpu_overhead_us_per_block": (mine[1] - bare[1]) / n * 1e6,
                }
                report.rows.append(row)
                report.say(
                    f"{n:4} {path:<8} {mine[0] * 1e3:6.3f} ms {bare[0] * 1e3:6.3f} ms {mine[0] / bare[0]:6.2f} "
                    f"{row['overhead_us_per_block']:10.2f} us {row['cpu_overhead_us_per_block']:14.2f} us"
                )


def copy_ceiling(nbytes: int) -> tuple[float, float]:
    """Seconds of one large device -> pinned and pinned -> device ``cudaMemcpyAsync`` of ``nbytes`` (median of 5)."""
    import cupy
    import numpy as np

    device = cupy.empty(nbytes, dtype=cupy.uint8)
    pinned = cupy.cuda.alloc_pinned_memory(nbytes)
    host = np.frombuffer(pinned, dtype=np.uint8, count=nbytes)
    stream = cupy.cuda.Stream(non_blocking=True)

    def d2h() -> None:
        device.get(out=host, stream=stream)
        stream.synchronize()

    def h2d() -> None:
        device.set(host, stream=stream)
        stream.synchronize()

    d2h()
    h2d()
    return statistics.median(timed(d2h)[0] for _ in range(5)), statistics.median(timed(h2d)[0] for _ in range(5))


def run_gpu(args: argparse.Namespace, report: Report) -> None:
    block = block_bytes(GPU_MODEL)
    report.say(
        f"GPU: device LayerSeparate(outer) G1 <-> pinned FullyContiguous G2, blocks of {block // 2**20} MiB, "
        f"{GPU_BLOCKS} per tier, batches of 16, 4 in flight; median of {args.repeats} rounds after {WARMUP}"
    )
    for cascade in (False, True):
        report.say(
            "-- with a disk tier behind the host (each offloaded block goes on to G3 after the waiter is woken)"
            if cascade
            else "-- device and host tiers only"
        )
        report.say(
            f"{'N':>4} {'path':<8} {'manager GB/s':>13} {'engine GB/s':>12} {'ceiling':>8} {'manager':>8} "
            f"{'engine':>7} {'overhead/block':>15}"
        )
        tiers = {"device": GPU_BLOCKS, "host": GPU_BLOCKS, "disk": GPU_BLOCKS if cascade else 0}
        with build(GPU_MODEL, **tiers, pinned=True, directory=args.disk_dir) as manager:
            for n in NS:
                d2h, h2d = copy_ceiling(n * block)
                first = n * 10**6 + (10**5 if cascade else 0)
                results = both_ways(manager, Tier.G1, Tier.G2, n, args.repeats, first)
                for (path, (mine, bare)), ceiling in zip(results.items(), (d2h, h2d), strict=True):
                    nbytes = n * block
                    row = {
                        "mode": "gpu",
                        "cascade": cascade,
                        "n": n,
                        "path": path,
                        "manager_s": mine[0],
                        "engine_s": bare[0],
                        "ceiling_s": ceiling,
                        "manager_gbps": nbytes / mine[0] / 1e9,
                        "engine_gbps": nbytes / bare[0] / 1e9,
                        "ceiling_gbps": nbytes / ceiling / 1e9,
                        "manager_fraction": ceiling / mine[0],
                        "engine_fraction": ceiling / bare[0],
                        "overhead_us_per_block": (mine[0] - bare[0]) / n * 1e6,
                    }
                    report.rows.append(row)
                    report.say(
                        f"{n:4} {path:<8} {row['manager_gbps']:13.1f} {row['engine_gbps']:12.1f} "
                        f"{row['ceiling_gbps']:8.1f} {row['manager_fraction']:8.3f} {row['engine_fraction']:7.3f} "
                        f"{row['overhead_us_per_block']:12.1f} us"
                    )
    report.say("manager / engine columns: fraction of the ceiling (one large cudaMemcpyAsync of the same bytes)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_true", help="system <-> disk tiers with tiny blocks (default without GPU)")
    mode.add_argument("--gpu", action="store_true", help="device <-> pinned host with 4 MiB blocks (default with one)")
    parser.add_argument("--disk-dir", default=tempfile.gettempdir(), help="where the disk tier's file goes")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per row (default 41 CPU, 15 GPU)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    from kvbm_builder.storage import cuda_available

    gpu = args.gpu or (not args.cpu and cuda_available())
    args.repeats = args.repeats or (15 if gpu else 41)
    report = Report()
    report.say(
        f"bench_offload {datetime.datetime.now().isoformat(timespec='seconds')}: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}"
    )
    (run_gpu if gpu else run_cpu)(args, report)
    report.save(args.json, {"date": datetime.date.today().isoformat(), "mode": "gpu" if gpu else "cpu"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
