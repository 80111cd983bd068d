"""Quickstart: describe a Llama-3-8B-like KV cache with the builders, then allocate it on this machine.

With an NVIDIA GPU: a device tier (G1), a pinned host tier (G2) and a disk tier (G3).
Without one: a system-memory host tier and a disk tier (the embedded default), and it says so.

    python examples/quickstart.py [--disk-dir DIR] [--no-nixl]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time

from kvbm_builder import (
    DeviceAllocator,
    DiskAllocator,
    FullyContiguous,
    KvBlockManager,
    KvBlockManagerConfig,
    KvbmError,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    PinnedAllocator,
    SystemAllocator,
)
from kvbm_builder.config.allocators import ProgressCallback
from kvbm_builder.layout import LayoutSpec
from kvbm_builder.storage import cuda_available, cuda_unavailable_reason

GiB = 2**30


def progress_line(label: str) -> ProgressCallback:
    """A progress callback that redraws one terminal line while a large pinned tier comes up."""
    started: list[float] = []

    def report(done: int, total: int) -> None:
        if not started:  # the first call comes when pinning starts
            started.append(time.perf_counter())
        elapsed = time.perf_counter() - started[0]
        rate = done / GiB / elapsed if elapsed > 0 else 0.0
        end = "\n" if done >= total else ""
        print(f"\r  {label}: {done / GiB:6.2f} / {total / GiB:.2f} GiB pinned ({rate:5.1f} GiB/s)", end=end, flush=True)

    return report


def build_config(gpu: bool, nixl: bool, disk_dir: str) -> KvBlockManagerConfig:
    # Llama-3-8B: 32 layers, K and V (outer 2), 8 KV heads x 128 = 1024 elements per token, bf16 (2 bytes)
    model = KvManagerModelConfig.builder().num_layers(32).outer_dim(2).page_size(32).inner_dim(1024).build()
    runtime = KvManagerRuntimeConfig.builder().worker_id(0)
    runtime = runtime.enable_nixl() if nixl else runtime.disable_nixl()
    builder = KvBlockManagerConfig.builder().runtime(runtime.build()).model(model)
    if gpu:
        builder = builder.device_layout(
            KvManagerLayoutConfig.builder()
            .num_blocks(512)  # 2 GiB of GPU memory, one allocation per layer as engines like it
            .layout_type(LayerSeparate(outer_contiguous=True))
            .allocator(DeviceAllocator(device_id=0))
            .build()
        ).host_layout(
            KvManagerLayoutConfig.builder()
            .num_blocks(2048)  # 8 GiB pinned: at least the device tier (KVBM is write-through)
            .allocator(PinnedAllocator(device_id=0, progress=progress_line("host tier (G2)")))
            .build()
        )
    else:
        builder = builder.host_layout(
            KvManagerLayoutConfig.builder().num_blocks(64).allocator(SystemAllocator()).build()  # 256 MiB
        )
    disk_blocks = 4096 if gpu else 128  # 16 GiB with a GPU, 512 MiB without
    return builder.disk_layout(
        KvManagerLayoutConfig.builder()
        .num_blocks(disk_blocks)
        .layout_type(FullyContiguous())
        .allocator(DiskAllocator(directory=disk_dir))
        .build()
    ).build()


def describe(config: KvBlockManagerConfig) -> None:
    model = config.model
    print(
        f"model: {model.num_layers} layers x outer {model.outer_dim} x page {model.page_size} x inner {model.inner_dim}"
        f" x {model.dtype_width_bytes} B = {model.bytes_per_block / 2**20:.1f} MiB per block"
    )
    print(f"{'tier':<6} {'memory':<7} {'layout':<40} {'blocks':>7} {'GiB':>8} {'allocations':>11}")
    for tier, layout in config.tiers():
        spec = LayoutSpec.from_config(model, layout)
        kind = layout.storage_kind.value if layout.storage_kind is not None else "?"
        print(
            f"{tier.name:<6} {kind:<7} {layout.layout_type!s:<40} {spec.num_blocks:>7}"
            f" {spec.total_bytes / GiB:>8.2f} {spec.num_allocations:>11}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--disk-dir", default=tempfile.gettempdir(), help="directory of the disk tier's file")
    parser.add_argument("--no-nixl", action="store_true", help="do not register the tiers with NIXL")
    args = parser.parse_args(argv)

    gpu = cuda_available()
    nixl = not args.no_nixl and importlib.util.find_spec("nixl") is not None
    if gpu:
        print("GPU found: allocating a device tier (G1), a pinned host tier (G2) and a disk tier (G3).")
    else:
        print(f"No usable GPU here ({cuda_unavailable_reason()}):")
        print("allocating a system-memory host tier (G2) and a disk tier (G3) instead.")
    if not nixl:
        print("NIXL is off (not installed, or --no-nixl): install 'kvbm-builder[nixl]' to register the tiers.")
    try:
        config = build_config(gpu, nixl, args.disk_dir)
        describe(config)
        started = time.perf_counter()
        with KvBlockManager(config) as manager:
            total = time.perf_counter() - started
            for tier in manager.tiers.values():
                took = f"{tier.nbytes / GiB:.2f} GiB in {tier.bringup_seconds:.3f} s"
                print(f"  {tier.tier.name} ({tier.tier.words}): {took}")
            print(f"all tiers up in {total:.3f} s; NIXL agent: {'yes' if manager.nixl_agent is not None else 'none'}")
            if gpu:
                print("  (the device tier's time includes creating the CUDA context, the GPU's first use here)")
            host = manager.host
            if host is not None:
                block0 = host.views()[0][0]
                block0[...] = 7  # the host tier is real memory: write a block and read it back
                print(f"host block 0: {block0.nbytes} bytes, sum of its first layer = {int(block0[0].sum())}")
            region = manager.memory_region("G3", block=1, layer=0, outer=0)
            print(f"disk region (1, 0, 0): file offset {region.addr}, {region.size} bytes")
        print("released every tier.")
    except KvbmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
