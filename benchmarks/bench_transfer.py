"""Transfer throughput against the ceiling measured in the same run (issue 9's benchmark).

Blocks of 4 MiB (32 layers x 2 x page 32 x inner 1024 x 2 bytes), N = 16, 64, 256 random non-contiguous block ids:

- device <-> pinned host: device LayerSeparate(outer-contiguous) <-> host FullyContiguous, and FullyContiguous on
  both sides; offload and onboard; every copy method (``auto`` is what the engine picks). Time is end to end: from
  the ``copy()`` call to the data being in place (address tables, launches and synchronisation included), median
  of repeats after warm-up, as GB/s and as a fraction of the ceiling: one large pinned ``cudaMemcpyAsync`` each way.
- kernel variants (threads, unroll, piece size, grid, table placement) and bounce chunk sizes, at N = 16 and 256;
- the address-table builder and ``submit()`` alone, in microseconds;
- host <-> disk against a plain sequential O_DIRECT write / read of the same bytes in the same directory; disk ->
  device and device -> disk (staged through pinned memory), pageable host <-> device (staged).

Every timed copy is checked afterwards (sampled blocks compared byte for byte). Writes ``transfer.json`` (and a
log) into ``--out``; ``benchmarks/plot_transfer.py`` draws the plot from it. Needs a GPU (cupy).

    python benchmarks/bench_transfer.py --out "$OUT" --disk-dir /tmp
"""

from __future__ import annotations

import argparse
import ctypes
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

import numpy as np

from kvbm_builder import DiskAllocator, FullyContiguous, LayerSeparate, PinnedAllocator
from kvbm_builder.layout import Layout, LayoutSpec
from kvbm_builder.storage import allocate_device, allocate_disk, allocate_pinned, allocate_system
from kvbm_builder.storage.disk import fs_type
from kvbm_builder.transfer import KernelConfig, TransferEngine, region_table

SHAPE = {"num_layers": 32, "outer_dim": 2, "page_size": 32, "inner_dim": 1024, "dtype_width_bytes": 2}
BLOCK = 32 * 2 * 32 * 1024 * 2  # 4 MiB
POOL = 512  # blocks in each layout: ids are drawn from twice the largest N
NS = (16, 64, 256)
GiB = 2**30
MiB = 2**20


def spec(layout_type: Any, num_blocks: int = POOL, alignment: int = 1) -> LayoutSpec:
    return LayoutSpec(num_blocks=num_blocks, layout_type=layout_type, alignment=alignment, **SHAPE)


def layout_of(spec_: LayoutSpec, make: Callable[[int], Any]) -> Layout:
    return Layout(spec_, [make(spec_.allocation_bytes) for _ in range(spec_.num_allocations)])


def median_time(
    call: Callable[..., Any], args: tuple[Any, ...] = (), *, repeats: int, warmup: int
) -> tuple[float, list[float]]:
    """Median and all wall times of ``call(*args)`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import cupy

        self.cupy = cupy
        self.args = args
        self.rng = np.random.default_rng(1234)
        self.results: dict[str, Any] = {"rows": [], "variants": [], "tables": [], "disk": [], "staged": []}
        self.log = open(Path(args.out) / "bench_transfer.log", "w")  # noqa: SIM115
        self.layouts: list[Layout] = []

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def keep(self, layout: Layout) -> Layout:
        self.layouts.append(layout)
        return layout

    def ids(self, n: int) -> tuple[Any, Any]:
        return self.rng.permutation(POOL)[:n], self.rng.permutation(POOL)[:n]

    def check(self, src: Layout, s_ids: Any, dst: Layout, d_ids: Any, samples: int = 3) -> None:
        """A timed copy must also be right: compare a few whole blocks through ``memory_region``."""
        for i in self.rng.choice(len(s_ids), min(samples, len(s_ids)), replace=False):
            a, b = _block(self.cupy, src, int(s_ids[i])), _block(self.cupy, dst, int(d_ids[i]))
            if a != b:
                raise SystemExit(f"WRONG BYTES: block {s_ids[i]} -> {d_ids[i]} differs after the copy")

    # --- sections ------------------------------------------------------------------------------------------

    def ceiling(self, device: Layout, host: Layout) -> None:
        cupy = self.cupy
        runtime = cupy.cuda.runtime
        nbytes = GiB
        d, h = device.storages[0].addr, host.storages[0].addr
        stream = cupy.cuda.Stream(non_blocking=True)
        out = {}
        for name, dst, src in (("d2h", h, d), ("h2d", d, h)):

            def run(dst: int = dst, src: int = src) -> None:
                runtime.memcpyAsync(dst, src, nbytes, 4, stream.ptr)
                stream.synchronize()

            seconds, _ = median_time(run, repeats=10, warmup=3)
            out[name] = nbytes / seconds / 1e9
        self.results["ceiling"] = out
        self.say(f"ceiling (one 1 GiB pinned cudaMemcpyAsync): D2H {out['d2h']:.1f} GB/s, H2D {out['h2d']:.1f} GB/s")

    def end_to_end(self, device_ls: Layout, device_fc: Layout, host: Layout) -> None:
        ceiling = self.results["ceiling"]
        methods = ["auto", "kernel", "table", "memcpy", "bounce"]
        engines = {m: TransferEngine(device_copy=m) for m in methods}
        try:
            for combo, device in (("LS(outer)<->FC", device_ls), ("FC<->FC", device_fc)):
                for n in NS:
                    d_ids, h_ids = self.ids(n)
                    for direction in ("offload", "onboard"):
                        src, s_ids, dst, t_ids = (
                            (device, d_ids, host, h_ids) if direction == "offload" else (host, h_ids, device, d_ids)
                        )
                        for method in methods:
                            engine = engines[method]
                            repeats = 60 if n <= 16 else 20 if n <= 64 else 9
                            copy_args = (src, s_ids, dst, t_ids)
                            seconds, times = median_time(engine.copy, copy_args, repeats=repeats, warmup=3)
                            record = [engine.copy(*copy_args)]
                            self.check(src, s_ids, dst, t_ids)
                            gbps = n * BLOCK / seconds / 1e9
                            ref = ceiling["d2h" if direction == "offload" else "h2d"]
                            row = {
                                "combo": combo,
                                "n": n,
                                "direction": direction,
                                "method": method,
                                "picked": record[0].method,
                                "seconds": seconds,
                                "gbps": gbps,
                                "fraction": gbps / ref,
                                "min_seconds": min(times),
                            }
                            self.results["rows"].append(row)
                            self.say(
                                f"{combo:15} N={n:3} {direction:7} {method:6} ({record[0].method:6}) "
                                f"{seconds * 1e3:8.3f} ms {gbps:6.1f} GB/s {gbps / ref:5.3f} of ceiling"
                            )
        finally:
            for engine in engines.values():
                engine.close()

    def variants(self, device_ls: Layout, host: Layout) -> None:
        ceiling = self.results["ceiling"]
        configs: list[tuple[str, str, KernelConfig]] = [
            ("kernel t512 u8", "kernel", KernelConfig(threads=512, unroll=8)),
            ("kernel params mapped", "kernel", KernelConfig(table_on_device=False)),
            ("bounce 16 MiB", "bounce", KernelConfig(bounce_bytes=16 * MiB)),
            ("bounce 64 MiB", "bounce", KernelConfig(bounce_bytes=64 * MiB)),
        ]
        if self.args.all_variants:
            for threads, unroll in ((128, 4), (512, 4), (256, 8), (1024, 2)):
                configs.append((f"kernel t{threads} u{unroll}", "kernel", KernelConfig(threads=threads, unroll=unroll)))
            for piece in (32, 128, 256):
                configs.append((f"kernel piece {piece}K", "kernel", KernelConfig(piece_bytes=piece * 1024)))
            configs.append(("kernel grid 528", "kernel", KernelConfig(max_grid=528)))
            for chunk in (4, 8, 32):
                configs.append((f"bounce {chunk} MiB", "bounce", KernelConfig(bounce_bytes=chunk * MiB)))
        self.raw(device_ls, host)
        for name, method, config in configs:
            with TransferEngine(device_copy=method, kernel=config) as engine:
                for n in (NS[0], NS[-1]):
                    d_ids, h_ids = self.ids(n)
                    for direction in ("offload", "onboard"):
                        args = (
                            (device_ls, d_ids, host, h_ids)
                            if direction == "offload"
                            else (host, h_ids, device_ls, d_ids)
                        )

                        seconds, _ = median_time(engine.copy, args, repeats=9 if n >= 256 else 21, warmup=2)
                        self.check(*args, samples=1)
                        gbps = n * BLOCK / seconds / 1e9
                        fraction = gbps / ceiling["d2h" if direction == "offload" else "h2d"]
                        self.results["variants"].append(
                            {"variant": name, "n": n, "direction": direction, "gbps": gbps, "fraction": fraction}
                        )
                        self.say(f"variant {name:24} N={n:3} {direction:7} {gbps:6.1f} GB/s {fraction:5.3f}")

    def raw(self, device_ls: Layout, host: Layout) -> None:
        """The GPU work alone: one batch's copy queued and waited for on one slot, no engine around it (what the
        engine's Python costs is the difference to the end-to-end rows)."""
        ceiling = self.results["ceiling"]
        with TransferEngine() as engine:
            engine.copy(device_ls, [0], host, [0])  # makes the engine's CUDA context
            cuda = engine._cuda
            assert cuda is not None
            slot = cuda.slots[0]
            lane = slot.lanes[0]
            dev_side = engine._gpu_side(cuda, device_ls, "device")[1]
            host_side = engine._gpu_side(cuda, host, "host")[1]
            spec_ = device_ls.spec
            for method in ("kernel", "bounce"):
                for n in (NS[0], NS[-1]):
                    d_ids, h_ids = self.ids(n)
                    for direction in ("offload", "onboard"):
                        offload = direction == "offload"

                        def run(
                            method: str = method, d_ids: Any = d_ids, h_ids: Any = h_ids, offload: bool = offload
                        ) -> None:
                            if method == "bounce":
                                cuda.enqueue_bounce(slot, dev_side, d_ids, host_side, h_ids, spec_, offload=offload)
                            elif offload:
                                cuda.enqueue_blocks(slot, lane, dev_side, d_ids, host_side, h_ids, spec_)
                            else:
                                cuda.enqueue_blocks(slot, lane, host_side, h_ids, dev_side, d_ids, spec_)
                            cuda.wait(lane, method)

                        seconds, _ = median_time(run, repeats=9 if n >= 256 else 21, warmup=2)
                        gbps = n * BLOCK / seconds / 1e9
                        fraction = gbps / ceiling["d2h" if offload else "h2d"]
                        name = f"raw {method} (no engine)"
                        self.results["variants"].append(
                            {"variant": name, "n": n, "direction": direction, "gbps": gbps, "fraction": fraction}
                        )
                        self.say(f"variant {name:24} N={n:3} {direction:7} {gbps:6.1f} GB/s {fraction:5.3f}")

    def tables(self, device_ls: Layout, device_fc: Layout, host: Layout) -> None:
        with TransferEngine() as engine:
            for combo, device in (("LS(outer)<->FC", device_ls), ("FC<->FC", device_fc)):
                for n in NS:
                    d_ids, h_ids = self.ids(n)
                    as_list = (d_ids.tolist(), h_ids.tolist())
                    table_args = (device, as_list[0], host, as_list[1])
                    table_s, _ = median_time(region_table, table_args, repeats=200, warmup=20)
                    runs = len(region_table(device, d_ids, host, h_ids))
                    submit_s, _ = median_time(engine.copy, table_args, repeats=20, warmup=3)
                    futures: list[Any] = []
                    launch_s, _ = median_time(_submit_into, (engine, futures, table_args), repeats=20, warmup=0)
                    for future in futures:
                        future.result()
                    row = {
                        "combo": combo,
                        "n": n,
                        "runs": runs,
                        "table_us": table_s * 1e6,
                        "submit_return_us": launch_s * 1e6,
                        "copy_us": submit_s * 1e6,
                    }
                    self.results["tables"].append(row)
                    self.say(
                        f"table {combo:15} N={n:3} {runs:6} runs: region_table {table_s * 1e6:7.1f} us, "
                        f"submit() returns in {launch_s * 1e6:7.1f} us (queue may be full), "
                        f"copy {submit_s * 1e3:.3f} ms"
                    )

    def disk(self, host: Layout, device_ls: Layout) -> None:
        directory = self.args.disk_dir
        o_direct = True
        try:
            disk = self.keep(
                layout_of(spec(FullyContiguous()), lambda n: allocate_disk(n, DiskAllocator(directory=directory)))
            )
        except Exception as exc:  # a file system without O_DIRECT (tmpfs): say so and measure buffered I/O
            self.say(f"disk: O_DIRECT refused in {directory} ({exc}); measuring without it")
            o_direct = False
            disk = self.keep(
                layout_of(
                    spec(FullyContiguous()),
                    lambda n: allocate_disk(n, DiskAllocator(directory=directory, o_direct=False)),
                )
            )
        self.results["disk_fs"] = fs_type(directory)
        self.results["disk_o_direct"] = o_direct
        self.say(f"disk: {directory} on {self.results['disk_fs']}, O_DIRECT {o_direct}")
        with TransferEngine() as engine:
            for n in NS:
                nbytes = n * BLOCK
                write_s, read_s = _sequential(directory, host.storages[0].addr, nbytes, o_direct)
                h_ids, k_ids = self.ids(n)
                reps = 5 if n < 256 else 3
                off_s, _ = median_time(engine.copy, (host, h_ids, disk, k_ids), repeats=reps, warmup=1)
                self.check(host, h_ids, disk, k_ids)
                on_s, _ = median_time(engine.copy, (disk, k_ids, host, h_ids), repeats=reps, warmup=1)
                self.check(disk, k_ids, host, h_ids)
                d_ids, _ = self.ids(n)
                d2d_s, _ = median_time(engine.copy, (disk, k_ids, device_ls, d_ids), repeats=reps, warmup=1)
                self.check(disk, k_ids, device_ls, d_ids)
                dev2disk_s, _ = median_time(engine.copy, (device_ls, d_ids, disk, k_ids), repeats=reps, warmup=1)
                self.check(device_ls, d_ids, disk, k_ids)
                row = {
                    "n": n,
                    "seq_write_gbps": nbytes / write_s / 1e9,
                    "seq_read_gbps": nbytes / read_s / 1e9,
                    "host_to_disk_gbps": nbytes / off_s / 1e9,
                    "disk_to_host_gbps": nbytes / on_s / 1e9,
                    "disk_to_device_gbps": nbytes / d2d_s / 1e9,
                    "device_to_disk_gbps": nbytes / dev2disk_s / 1e9,
                }
                row["write_fraction"] = row["host_to_disk_gbps"] / row["seq_write_gbps"]
                row["read_fraction"] = row["disk_to_host_gbps"] / row["seq_read_gbps"]
                self.results["disk"].append(row)
                self.say(
                    f"disk N={n:3}: sequential write {row['seq_write_gbps']:5.2f}"
                    f" read {row['seq_read_gbps']:5.2f} GB/s;"
                    f" host->disk {row['host_to_disk_gbps']:5.2f} ({row['write_fraction']:.2f}),"
                    f" disk->host {row['disk_to_host_gbps']:5.2f} ({row['read_fraction']:.2f}),"
                    f" disk->device {row['disk_to_device_gbps']:5.2f}, device->disk {row['device_to_disk_gbps']:5.2f}"
                )

    def pageable(self, device_ls: Layout) -> None:
        system = self.keep(layout_of(spec(FullyContiguous()), allocate_system))
        for s in system.storages:
            s.as_numpy()[:] = 1  # type: ignore[attr-defined]  # fault the pages in: first touch is not a transfer
        ceiling = self.results["ceiling"]
        with TransferEngine() as engine:
            for n in NS:
                d_ids, h_ids = self.ids(n)
                off_s, _ = median_time(engine.copy, (device_ls, d_ids, system, h_ids), repeats=5, warmup=2)
                self.check(device_ls, d_ids, system, h_ids)
                on_s, _ = median_time(engine.copy, (system, h_ids, device_ls, d_ids), repeats=5, warmup=2)
                self.check(system, h_ids, device_ls, d_ids)
                row = {"n": n, "offload_gbps": n * BLOCK / off_s / 1e9, "onboard_gbps": n * BLOCK / on_s / 1e9}
                row["offload_fraction"] = row["offload_gbps"] / ceiling["d2h"]
                row["onboard_fraction"] = row["onboard_gbps"] / ceiling["h2d"]
                self.results["staged"].append(row)
                self.say(
                    f"pageable N={n:3}: device->system {row['offload_gbps']:5.1f} GB/s ({row['offload_fraction']:.2f}),"
                    f" system->device {row['onboard_gbps']:5.1f} GB/s ({row['onboard_fraction']:.2f})"
                )

    def close(self) -> None:
        for layout in self.layouts:
            for storage in layout.storages:
                storage.close()  # type: ignore[attr-defined]
        self.log.close()


def _submit_into(engine: TransferEngine, futures: list[Any], args: tuple[Any, ...]) -> None:
    futures.append(engine.submit(*args))


def _block(cupy: Any, layout: Layout, block: int) -> bytes:
    parts = []
    for layer in range(layout.spec.num_layers):
        for outer in range(layout.spec.outer_dim):
            region = layout.memory_region(block, layer, outer)
            storage = layout.storages[region.storage_index]
            if storage.kind.value == "device":
                host = np.empty(region.size, dtype=np.uint8)
                cupy.cuda.runtime.memcpy(host.ctypes.data, region.addr, region.size, 4)
                parts.append(host.tobytes())
            elif storage.kind.value == "disk":
                buf = bytearray(region.size)
                storage.read_into(region.addr, buf)  # type: ignore[attr-defined]
                parts.append(bytes(buf))
            else:
                parts.append(ctypes.string_at(region.addr, region.size))
    return b"".join(parts)


def _sequential(directory: str, addr: int, nbytes: int, o_direct: bool) -> tuple[float, float]:
    """A plain sequential write, then read, of ``nbytes`` from aligned memory at ``addr``, 64 MiB per call."""
    view = memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")
    fd, path = tempfile.mkstemp(dir=directory, prefix="kvbm-seq-")
    os.close(fd)
    flags = os.O_RDWR | (os.O_DIRECT if o_direct else 0)
    fd = os.open(path, flags)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        step = 64 * MiB
        start = time.perf_counter()
        for offset in range(0, nbytes, step):
            os.pwrite(fd, view[offset : offset + step], offset)
        if not o_direct:
            os.fsync(fd)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        for offset in range(0, nbytes, step):
            os.preadv(fd, [view[offset : offset + step]], offset)
        read_s = time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)
        view.release()
    return write_s, read_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for transfer.json and the log")
    parser.add_argument("--disk-dir", default="/tmp", help="directory of the disk tier and the sequential baseline")
    parser.add_argument("--all-variants", action="store_true", help="every kernel and bounce variant, not a few")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer, smaller transfers (no results)")
    parser.add_argument(
        "--sections",
        default="ceiling,end-to-end,tables,variants,disk,pageable",
        help="comma-separated sections to run (ceiling always runs)",
    )
    args = parser.parse_args()
    if args.quick:
        global POOL, NS
        POOL, NS = 48, (4, 16)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    cupy = bench.cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    bench.results["card"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    bench.results["driver"] = cupy.cuda.runtime.driverGetVersion()
    bench.results["date"] = datetime.date.today().isoformat()
    bench.results["python"] = platform.python_version()
    bench.results["cupy"] = cupy.__version__
    bench.results["cpus"] = os.cpu_count()
    bench.say(
        f"{bench.results['card']}, driver {bench.results['driver']}, cupy {cupy.__version__}, {os.cpu_count()} CPUs"
    )
    sections = set(args.sections.split(","))
    try:
        device_ls = bench.keep(layout_of(spec(LayerSeparate(outer_contiguous=True)), lambda n: allocate_device(n, 0)))
        device_fc = bench.keep(layout_of(spec(FullyContiguous()), lambda n: allocate_device(n, 0)))
        host = bench.keep(layout_of(spec(FullyContiguous()), lambda n: allocate_pinned(n, PinnedAllocator())))
        rng = np.random.default_rng(7)
        for layout in (device_ls, device_fc):
            for storage in layout.storages:
                storage.as_cupy()[:] = cupy.asarray(rng.integers(0, 256, storage.size, dtype=np.uint8))  # type: ignore[attr-defined]
        host.storages[0].as_numpy()[:] = rng.integers(0, 256, host.storages[0].size, dtype=np.uint8)  # type: ignore[attr-defined]
        bench.ceiling(device_fc, host)
        if "end-to-end" in sections:
            bench.end_to_end(device_ls, device_fc, host)
        if "tables" in sections:
            bench.tables(device_ls, device_fc, host)
        if "variants" in sections:
            bench.variants(device_ls, host)
        if "disk" in sections:
            bench.disk(host, device_ls)
        if "pageable" in sections:
            bench.pageable(device_ls)
    finally:
        with open(Path(args.out) / "transfer.json", "w") as f:
            json.dump(bench.results, f, indent=1)
        bench.close()
    summary(bench.results)


def summary(results: dict[str, Any]) -> None:
    """The short table, printed last."""
    print("\n=== transfer summary (end to end, engine's own choice 'auto'; fraction of the same-run ceiling)")
    print(f"ceiling D2H {results['ceiling']['d2h']:.1f} GB/s, H2D {results['ceiling']['h2d']:.1f} GB/s")
    print(f"{'layouts':15} {'dir':8} " + " ".join(f"{'N=' + str(n):>16}" for n in NS))
    for combo in ("LS(outer)<->FC", "FC<->FC"):
        for direction in ("offload", "onboard"):
            cells = []
            for n in NS:
                row = next(
                    (
                        r
                        for r in results["rows"]
                        if (r["combo"], r["direction"], r["n"], r["method"]) == (combo, direction, n, "auto")
                    ),
                    None,
                )
                cells.append(f"{row['gbps']:5.1f} ({row['fraction']:.3f})" if row else "-")
            print(f"{combo:15} {direction:8} " + " ".join(f"{c:>16}" for c in cells))
    best: dict[tuple[str, int], tuple[float, str]] = {}
    for r in results["rows"]:
        key = (f"{r['combo']} {r['direction']}", r["n"])
        if r["fraction"] > best.get(key, (0.0, ""))[0]:
            best[key] = (r["fraction"], r["method"])
    print("best method per case: " + "; ".join(f"{k[0]} N={k[1]}: {v[1]} {v[0]:.3f}" for k, v in sorted(best.items())))
    for row in results.get("disk", []):
        print(
            f"disk N={row['n']}: host->disk {row['write_fraction']:.2f} of seq write, disk->host "
            f"{row['read_fraction']:.2f} of seq read; disk->device {row['disk_to_device_gbps']:.2f} GB/s"
        )


if __name__ == "__main__":
    sys.exit(main())
