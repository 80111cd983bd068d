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


def median_ms(run: Callable[[], Callable[[], None]], repeat: int) -> tuple[float, float]:
    """Median milliseconds of ``run()`` (the bring-up) and of the release it returns."""
    up, down = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        release = run()
        up.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        release()
        down.append((time.perf_counter() - start) * 1e3)
    return statistics.median(up), statistics.median(down)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64MiB,1GiB,8GiB,32GiB")
    parser.add_argument("--layers", type=int, default=32, help="allocations of the layer-separate row")
    parser.add_argument("--repeat", type=int, default=5)
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

    rows = []
    for text in args.sizes.split(","):
        size = parse_size(text.strip())
        free = runtime.memGetInfo()[0]
        if size > free - GiB:
            print(f"{text}: skipped, {free / GiB:.1f} GiB free")
            continue
        base_up, base_down = median_ms(ceiling(size), args.repeat)
        up, down = median_ms(ours(size), args.repeat)
        rows.append((f"{text} x1", up, down, base_up, base_down))
        if size >= args.layers * 2**20:
            lup, ldown = median_ms(ours(size, args.layers), args.repeat)
            rows.append((f"{text} as {args.layers} layers", lup, ldown, base_up, base_down))
    print()
    print(f"{'tier':<22}|{'bring-up ms':>12}|{'close ms':>9}|{'1 malloc ms':>12}|{'1 free ms':>10}|{'x ceiling':>10}")
    print("-" * 80)
    for name, up, down, base_up, base_down in rows:
        print(f"{name:<22}|{up:12.3f}|{down:9.3f}|{base_up:12.3f}|{base_down:10.3f}|{up / base_up:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
