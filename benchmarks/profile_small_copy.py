"""Where the time of one small device <-> pinned copy goes: why 16 blocks (64 MiB) miss 0.90 of the ceiling.

Run on a GPU machine: ``python benchmarks/profile_small_copy.py [--blocks 16] [--profile]``. It prints, for 4 MiB
blocks (the shape of ``bench_transfer.py``), in one run:

- the ceiling, one pinned ``cudaMemcpyAsync`` of 1 GiB, and the same for exactly the bytes of the small copy;
- end to end ``TransferEngine.copy()`` (median), for device LayerSeparate(outer) and FullyContiguous <-> pinned host;
- how long ``submit()`` takes to return (checks and launch) and the wait after it;
- the GPU time of the engine's own kernel for the same blocks (CUDA events around it, parameters included);
- with ``--profile``, the engine's functions by their own time over 300 copies (cProfile inflates them ~2x);
- with ``--batch``, the same copies as one ``cuMemcpyBatchAsync`` of the run table, at 16, 64 and 256 blocks: GPU
  time, end to end (table, call, wait) and the bytes checked, against the kernel's GPU time for the same blocks.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import cupy
import numpy as np
from bench_transfer import BLOCK, _block, layout_of, spec

from kvbm_builder import FullyContiguous, LayerSeparate, PinnedAllocator
from kvbm_builder.storage import allocate_device, allocate_pinned
from kvbm_builder.transfer import TransferEngine
from kvbm_builder.transfer._batch import batch_copy
from kvbm_builder.transfer._table import region_table

_MEMCPY_DEFAULT = 4


def median_seconds(fn: Callable[[], object], repeats: int = 60, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--batch", action="store_true")
    args = parser.parse_args()
    n = args.blocks
    device_ls = layout_of(spec(LayerSeparate(outer_contiguous=True)), lambda size: allocate_device(size, 0))
    device_fc = layout_of(spec(FullyContiguous()), lambda size: allocate_device(size, 0))
    host = layout_of(spec(FullyContiguous()), lambda size: allocate_pinned(size, PinnedAllocator()))
    stream = cupy.cuda.Stream(non_blocking=True)
    ceiling = {}
    for nbytes in (2**30, n * BLOCK):
        for name, dst, src in (
            ("d2h", host.storages[0].addr, device_fc.storages[0].addr),
            ("h2d", device_fc.storages[0].addr, host.storages[0].addr),
        ):

            def one(dst: int = dst, src: int = src, nbytes: int = nbytes) -> None:
                cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream.ptr)
                stream.synchronize()

            seconds = median_seconds(one, repeats=20 if nbytes > 2**28 else 60)
            ceiling.setdefault(name, nbytes / seconds / 1e9)
            print(f"one memcpy {name} {nbytes >> 20:5} MiB: {seconds * 1e3:7.3f} ms {nbytes / seconds / 1e9:6.2f} GB/s")

    ids = np.random.default_rng(7).choice(512, size=2 * n, replace=False)
    d_ids, h_ids = ids[:n].tolist(), ids[n:].tolist()
    nbytes = n * BLOCK
    with TransferEngine() as engine:
        for combo, device in (("LS(outer)<->FC", device_ls), ("FC<->FC", device_fc)):
            for direction in ("offload", "onboard"):
                copy: tuple[Any, ...] = (
                    (device, d_ids, host, h_ids) if direction == "offload" else (host, h_ids, device, d_ids)
                )
                ref = ceiling["d2h" if direction == "offload" else "h2d"]
                seconds = median_seconds(lambda copy=copy: engine.copy(*copy))
                method = engine.copy(*copy).method
                split = []
                for _ in range(40):
                    start = time.perf_counter()
                    future = engine.submit(*copy)
                    launched = time.perf_counter()
                    future.result()
                    split.append((launched - start, time.perf_counter() - launched))
                cuda = engine._cuda
                assert cuda is not None
                slot = cuda.slots[0]
                lane = slot.lanes[0]
                src_side = engine._gpu_side(cuda, copy[0], "source")[1]
                dst_side = engine._gpu_side(cuda, copy[2], "target")[1]
                s_ids, t_ids = np.asarray(copy[1], dtype=np.int64), np.asarray(copy[3], dtype=np.int64)
                begin, end = cupy.cuda.Event(), cupy.cuda.Event()
                gpu = []
                for _ in range(30):
                    begin.record(slot.stream)
                    cuda.enqueue_blocks(slot, lane, src_side, s_ids, dst_side, t_ids, device.spec)
                    end.record(slot.stream)
                    end.synchronize()
                    gpu.append(cupy.cuda.get_elapsed_time(begin, end) * 1e-3)
                kernel = statistics.median(gpu)
                print(
                    f"{combo:15} N={n} {direction:7} end to end {seconds * 1e3:6.3f} ms "
                    f"({nbytes / seconds / 1e9 / ref:5.3f} of the 1 GiB ceiling, method {method}); "
                    f"submit returns after {statistics.median(a for a, _ in split) * 1e6:5.0f} us, "
                    f"waits {statistics.median(b for _, b in split) * 1e6:5.0f} us; "
                    f"kernel alone {kernel * 1e3:6.3f} ms ({nbytes / kernel / 1e9 / ref:5.3f})"
                )
        if args.batch:
            probe_batch(engine, ceiling, device_ls, device_fc, host)
        if args.profile:
            copy = (device_ls, d_ids, host, h_ids)
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(300):
                engine.copy(*copy)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)


def probe_batch(engine: TransferEngine, ceiling: dict[str, float], device_ls: Any, device_fc: Any, host: Any) -> None:
    function = batch_copy()
    if function is None:
        print("cuMemcpyBatchAsync: not offered by this driver")
        return
    cuda = engine._cuda
    assert cuda is not None
    slot = cuda.slots[0]
    lane = slot.lanes[0]
    stream = slot.stream
    rng = np.random.default_rng(11)
    for combo, device in (("LS(outer)<->FC", device_ls), ("FC<->FC", device_fc)):
        for n in (16, 64, 256):
            ids = rng.choice(512, size=2 * n, replace=False)
            d_ids, h_ids = ids[:n].tolist(), ids[n:].tolist()
            for direction in ("offload", "onboard"):
                copy = (device, d_ids, host, h_ids) if direction == "offload" else (host, h_ids, device, d_ids)
                ref = ceiling["d2h" if direction == "offload" else "h2d"]
                nbytes = n * BLOCK

                def one(copy: Any = copy) -> None:
                    table = region_table(*copy)
                    with cuda.device:
                        function(table.dst, table.src, table.size, stream.ptr)
                    lane.event.record(stream)
                    lane.event.synchronize()

                seconds = median_seconds(one, repeats=40 if n < 256 else 15)
                table = region_table(*copy)
                begin, end = cupy.cuda.Event(), cupy.cuda.Event()
                gpu, kernel = [], []
                src_side = engine._gpu_side(cuda, copy[0], "source")[1]
                dst_side = engine._gpu_side(cuda, copy[2], "target")[1]
                s_ids, t_ids = np.asarray(copy[1], dtype=np.int64), np.asarray(copy[3], dtype=np.int64)
                for _ in range(20):
                    begin.record(stream)
                    with cuda.device:
                        function(table.dst, table.src, table.size, stream.ptr)
                    end.record(stream)
                    end.synchronize()
                    gpu.append(cupy.cuda.get_elapsed_time(begin, end) * 1e-3)
                    begin.record(stream)
                    cuda.enqueue_blocks(slot, lane, src_side, s_ids, dst_side, t_ids, device.spec)
                    end.record(stream)
                    end.synchronize()
                    kernel.append(cupy.cuda.get_elapsed_time(begin, end) * 1e-3)
                paint(copy[0], copy[1], lambda block, layer, outer: 1 + (block * 7 + layer * 3 + outer) % 251)
                paint(copy[2], copy[3], lambda block, layer, outer: 0)
                with cuda.device:
                    function(table.dst, table.src, table.size, stream.ptr)
                stream.synchronize()
                checked = all(
                    _block(cupy, copy[0], s) == _block(cupy, copy[2], d)
                    for s, d in list(zip(copy[1], copy[3], strict=True))[:: max(1, n // 4)]
                )
                g, k = statistics.median(gpu), statistics.median(kernel)
                print(
                    f"batch {combo:15} N={n:3} {direction:7} {len(table):5} runs of {int(table.size.max()) >> 10} KiB:"
                    f" end to end {seconds * 1e3:7.3f} ms ({nbytes / seconds / 1e9 / ref:5.3f}), GPU {g * 1e3:7.3f} ms"
                    f" ({nbytes / g / 1e9 / ref:5.3f}); kernel GPU {k * 1e3:7.3f} ms ({nbytes / k / 1e9 / ref:5.3f});"
                    f" bytes {'checked' if checked else 'WRONG'}"
                )


def paint(layout: Any, blocks: list[int], value: Callable[[int, int, int], int]) -> None:
    """Set every region of ``blocks`` to one byte value each (so a copy that moved nothing, or the wrong region,
    shows)."""
    spec_ = layout.spec
    for block in blocks:
        for layer in range(spec_.num_layers):
            for outer in range(spec_.outer_dim):
                region = layout.memory_region(block, layer, outer)
                byte = value(block, layer, outer)
                if layout.storages[region.storage_index].kind.value == "device":
                    cupy.cuda.runtime.memset(region.addr, byte, region.size)
                else:
                    ctypes.memset(region.addr, byte, region.size)
    cupy.cuda.runtime.deviceSynchronize()


if __name__ == "__main__":
    main()
