"""Bring-up time of a device tier (G1): ``allocate_device`` (plus close) for several sizes, against the
ceiling of one bare ``cupy.cuda.runtime.malloc`` / ``free`` of the same size, measured in the same run;
and a LayerSeparate-style tier (one allocation per layer) against one allocation of the same total.

    python benchmarks/bench_device.py [--sizes 64MiB,1GiB,8GiB,32GiB] [--layers 32] [--repeat 5]

Needs a CUDA GPU; sizes that do not fit in free GPU memory are skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbm_builder import parse_size
from kvbm_builder.storage import allocate_device, cuda_available, cuda_unavailable_reason

GiB = 2**30


def median_ms(
    runs: dict[str, Callable[[], Callable[[], None]]], repeat: int, settle: Callable[[], None]
) -> dict[str, tuple[float, float]]:
    """Median milliseconds of each ``run()`` (the bring-up) and of the release it returns. The runs take
    turns, in alternating order, and ``settle()`` (untimed) lets the driver finish its lazy work after a
    large free: a 32 GiB cudaMalloc right after a 32 GiB cudaFree was seen to take 25 times longer."""
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runs}
    for run in runs.values():  # untimed: the first allocation of a size pays for more than the next ones
        run()()
    order = list(runs.items())
    for i in range(repeat):
        for name, run in order if i % 2 else reversed(order):
            start = time.perf_counter()
            release = run()
            times[name][0].append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            release()
            times[name][1].append((time.perf_counter() - start) * 1e3)
            settle()
    return {name: (statistics.median(up), statistics.median(down)) for name, (up, down) in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64MiB,1GiB,8GiB,32GiB")
    parser.add_argument("--layers", type=int, default=32, help="allocations of the layer-separate row")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if not cuda_available():
        print(f"bench_device needs a CUDA GPU: {cuda_unavailable_reason()}")
        return 2
    import cupy

    runtime = cupy.cuda.runtime
    props = runtime.getDeviceProperties(0)
    print(
        f"GPU 0: {props['name'].decode()} | driver {runtime.driverGetVersion()} | cupy {cupy.__version__} | "
        f"date {time.strftime('%Y-%m-%d')} | median of {args.repeat}"
    )
    # first CUDA call creates the context: keep it out of every timing
    runtime.free(runtime.malloc(1))

    def ours(size: int, count: int = 1) -> Callable[[], Callable[[], None]]:
        def run() -> Callable[[], None]:
            storages = [allocate_device(size // count, 0) for _ in range(count)]

            def release() -> None:
                for storage in storages:
                    storage.close()

            return release

        return run

    def ceiling(size: int) -> Callable[[], Callable[[], None]]:
        def run() -> Callable[[], None]:
            ptr = runtime.malloc(size)
            return lambda: runtime.free(ptr)

        return run

    def settle() -> None:
        runtime.deviceSynchronize()
        time.sleep(0.05)

    rows = []
    for text in args.sizes.split(","):
        size = parse_size(text.strip())
        free = runtime.memGetInfo()[0]
        if size > free - GiB:
            print(f"{text}: skipped, {free / GiB:.1f} GiB free")
            continue
        runs = {"ceiling": ceiling(size), "ours": ours(size)}
        if size >= args.layers * 2**20:
            runs["layers"] = ours(size, args.layers)
        got = median_ms(runs, args.repeat, settle)
        base_up, base_down = got["ceiling"]
        rows.append((f"{text} x1", *got["ours"], base_up, base_down))
        if "layers" in got:
            rows.append((f"{text} as {args.layers} layers", *got["layers"], base_up, base_down))
    print()
    print(f"{'tier':<22}|{'bring-up ms':>12}|{'close ms':>9}|{'1 malloc ms':>12}|{'1 free ms':>10}|{'x ceiling':>10}")
    print("-" * 80)
    for name, up, down, base_up, base_down in rows:
        print(f"{name:<22}|{up:12.3f}|{down:9.3f}|{base_up:12.3f}|{base_down:10.3f}|{up / base_up:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
