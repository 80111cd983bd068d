"""Where the time of one small device <-> pinned copy goes: why 16 blocks (64 MiB) miss 0.90 of the ceiling.

Run on a GPU machine: ``python benchmarks/profile_small_copy.py [--blocks 16] [--profile]``. It prints, for 4 MiB
blocks (the shape of ``bench_transfer.py``), in one run:

- the ceiling, one pinned ``cudaMemcpyAsync`` of 1 GiB, and the same for exactly the bytes of the small copy;
- end to end ``TransferEngine.copy()`` (median), for device LayerSeparate(outer) and FullyContiguous <-> pinned host;
- how long ``submit()`` takes to return (checks and launch) and the wait after it;
- the GPU time of the engine's own kernel for the same blocks (CUDA events around it, parameters included);
- with ``--profile``, the engine's functions by their own time over 300 copies (cProfile inflates them ~2x).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import cupy
import numpy as np
from bench_transfer import BLOCK, layout_of, spec

from kvbm_builder import FullyContiguous, LayerSeparate, PinnedAllocator
from kvbm_builder.storage import allocate_device, allocate_pinned
from kvbm_builder.transfer import TransferEngine

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
        if args.profile:
            copy = (device_ls, d_ids, host, h_ids)
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(300):
                engine.copy(*copy)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
