"""Bring-up time of a pinned host tier (G2): our mmap + parallel populate + cudaHostRegister variants
against plain cudaHostAlloc in the same run, and host-to-device copy bandwidth from each buffer (proof
that it is really pinned: pageable memory copies at a fraction of that).

    python benchmarks/bench_pinned.py [--size 16GiB] [--copy 1GiB] [--budget 170]

Needs a CUDA GPU. Prints one line per variant as it goes, then a table. Stops starting new variants once
``--budget`` seconds have passed, so that it ends within about three minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbm_builder import PinnedAllocator, PinningMode, parse_size
from kvbm_builder.storage import (
    PinnedStorage,
    PinTuning,
    _host,
    allocate_device,
    allocate_pinned,
    allocate_system,
    cuda_available,
    cuda_unavailable_reason,
)

GiB = 2**30


def h2d_bandwidth(cupy: Any, src: int, dst: int, nbytes: int, repeat: int = 5) -> float:
    """Best host-to-device GB/s over ``repeat`` async copies of ``nbytes`` from ``src``, timed with CUDA events."""
    runtime = cupy.cuda.runtime
    stream = cupy.cuda.Stream(non_blocking=True)
    best = float("inf")
    for _ in range(repeat):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        runtime.memcpyAsync(dst, src, nbytes, runtime.memcpyHostToDevice, stream.ptr)
        end.record(stream)
        end.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return nbytes / best / 1e9


class Row:
    def __init__(
        self, name: str, seconds: float, size: int, phases: dict[str, float], h2d: float, close: float
    ) -> None:
        self.name, self.seconds, self.size, self.phases, self.h2d, self.close = name, seconds, size, phases, h2d, close

    @property
    def gib_s(self) -> float:
        return self.size / GiB / self.seconds


def measure(name: str, size: int, make: Callable[[], Any], cupy: Any, dev_addr: int, copy_bytes: int) -> Row:
    start = time.perf_counter()
    storage = make()
    seconds = time.perf_counter() - start
    try:
        h2d = h2d_bandwidth(cupy, storage.addr + storage.size - copy_bytes, dev_addr, copy_bytes)
        phases = storage.phase_seconds if isinstance(storage, PinnedStorage) else {}
    finally:
        start = time.perf_counter()
        storage.close()
        close = time.perf_counter() - start
    row = Row(name, seconds, size, phases, h2d, close)
    detail = " ".join(f"{k}={v:.2f}s" for k, v in phases.items())
    print(f"  {name:<34} {seconds:7.2f} s  {row.gib_s:6.2f} GiB/s  H2D {h2d:6.1f} GB/s  close {close:5.2f} s  {detail}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="16GiB", help="pinned tier size (default 16GiB)")
    parser.add_argument("--copy", default="1GiB", help="bytes per H2D bandwidth copy (default 1GiB)")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds after which no new variant starts")
    args = parser.parse_args()
    size, copy_bytes = parse_size(args.size), parse_size(args.copy)
    if not cuda_available():
        print(f"bench_pinned needs a CUDA GPU: {cuda_unavailable_reason()}")
        return 2
    import cupy

    began = time.perf_counter()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(
        f"GPU 0: {props['name'].decode()} | driver {cupy.cuda.runtime.driverGetVersion()} | "
        f"cupy {cupy.__version__} | python {platform.python_version()} | {os.cpu_count()} CPUs | "
        f"{_host.numa_node_count()} NUMA node(s) | THP {thp.read_text().strip() if thp.exists() else '?'} | "
        f"RLIMIT_MEMLOCK {_host.memlock_limit()} | date {time.strftime('%Y-%m-%d')}"
    )
    print(f"tier size {size / GiB:.2f} GiB, H2D copies of {copy_bytes / GiB:.2f} GiB")

    # A VM may hand memory to the guest only as it is first used: grow it once, outside every timing.
    start = time.perf_counter()
    with allocate_system(size) as warm:
        assert warm._mapping is not None
        _host.populate(warm._mapping, "warm-up", threads=16, chunk_bytes=64 * 2**20, progress=_host.Progress(None, 1))
    print(f"warm-up: populated and freed {size / GiB:.2f} GiB of host memory in {time.perf_counter() - start:.2f} s")

    device = allocate_device(copy_bytes, 0)
    rows: list[Row] = []
    try:
        with allocate_system(copy_bytes) as pageable:
            pageable.as_numpy()[:] = 1
            pageable_h2d = h2d_bandwidth(cupy, pageable.addr, device.addr, copy_bytes)
        print(f"pageable (unpinned) H2D: {pageable_h2d:.1f} GB/s")

        print("variants (bring-up = everything allocate_pinned does):")
        baseline = measure(
            "cudaHostAlloc (upstream)",
            size,
            lambda: allocate_pinned(size, PinnedAllocator(mode=PinningMode.host_alloc)),
            cupy,
            device.addr,
            copy_bytes,
        )
        rows.append(baseline)
        rows.append(
            measure(
                "cudaHostAlloc write-combined",
                size,
                lambda: allocate_pinned(
                    size, PinnedAllocator(mode=PinningMode.host_alloc), tuning=PinTuning(write_combined=True)
                ),
                cupy,
                device.addr,
                copy_bytes,
            )
        )
        mib = 2**20
        sixteen = PinnedAllocator(threads=16)
        variants: list[tuple[str, PinnedAllocator, PinTuning]] = []
        for threads in (16, 8, 4, 1):
            variants.append((f"register, {threads} thr", PinnedAllocator(threads=threads), PinTuning()))
        for chunk in (4, 64, 256):  # the default is 16 MiB
            variants.append(
                (f"register, 16 thr, {chunk} MiB pieces", sixteen, PinTuning(populate_chunk_bytes=chunk * mib))
            )
        variants.append(("register, 16 thr, no THP", sixteen, PinTuning(transparent_huge_pages=False)))
        variants.append(("register, 16 thr, hugetlb", PinnedAllocator(threads=16, huge_pages=True), PinTuning()))
        for name, spec, tuning in variants:
            if time.perf_counter() - began > args.budget:
                print(f"  {name:<34} skipped: past the {args.budget:.0f} s budget")
                continue
            rows.append(
                measure(
                    name,
                    size,
                    lambda spec=spec, tuning=tuning: allocate_pinned(size, spec, tuning=tuning),  # type: ignore[misc]
                    cupy,
                    device.addr,
                    copy_bytes,
                )
            )
    finally:
        device.close()

    print()
    print(
        f"{'variant':<36}|{'bring-up s':>11}|{'GiB/s':>8}|{'x hostAlloc':>12}|{'populate s':>11}|"
        f"{'register s':>11}|{'close s':>8}|{'H2D GB/s':>9}"
    )
    print("-" * 112)
    for row in rows:
        print(
            f"{row.name:<36}|{row.seconds:11.2f}|{row.gib_s:8.2f}|{baseline.seconds / row.seconds:12.2f}|"
            f"{row.phases.get('populate', float('nan')):11.2f}|{row.phases.get('register', float('nan')):11.2f}|"
            f"{row.close:8.2f}|{row.h2d:9.1f}"
        )
    print(f"(pageable H2D ceiling for contrast: {pageable_h2d:.1f} GB/s; total {time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
