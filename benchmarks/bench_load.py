"""How long ``load()`` of the realistic example takes, against a ceiling measured in the same run.

The *document* is ``examples/config.toml`` as a dict (what ``tomllib`` gives): runtime, a Llama-3-8B-like model,
a device tier by blocks, a 16 GiB pinned host tier and a 32 GB disk tier, both sized by byte budgets.

The *ceiling* builds the same configuration directly through the builders, the way a user writes it in Python:
the same eleven objects, every rule checked, but no document to read, no sizes to parse, no blocks to count.
The ratio says what reading a document adds. Target: at most 2.5x the builders (3.0x before the restructure).

Run: ``python benchmarks/bench_load.py [--rounds 25] [--loads 2000]``. Prints the medians of the rounds.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvbm_builder import KvBlockManagerConfig, KvManagerLayoutConfig, KvManagerModelConfig
from kvbm_builder.config import DeviceAllocator, DiskAllocator, KvManagerRuntimeConfig, PinnedAllocator, PinningMode
from kvbm_builder.loading import load, read_document

EXAMPLE = Path(__file__).parent.parent / "examples" / "config.toml"


def build_chain() -> KvBlockManagerConfig:
    """The example through the builders; the block counts are what the example's byte budgets come to."""
    return (
        KvBlockManagerConfig.builder()
        .runtime(KvManagerRuntimeConfig.builder().worker_id(0).enable_nixl().build())
        .model(
            KvManagerModelConfig.builder()
            .num_layers(32)
            .outer_dim(2)
            .page_size(32)
            .inner_dim(1024)
            .dtype_width_bytes(2)
            .build()
        )
        .device_layout(KvManagerLayoutConfig.builder().num_blocks(2048).allocator(DeviceAllocator(device_id=0)).build())
        .host_layout(
            KvManagerLayoutConfig.builder()
            .num_blocks(16 * 2**30 // 2**22)
            .allocator(PinnedAllocator(device_id=0, mode=PinningMode.register))
            .build()
        )
        .disk_layout(
            KvManagerLayoutConfig.builder()
            .num_blocks(32 * 10**9 // 2**22)
            .allocator(DiskAllocator(directory="/tmp", o_direct=True))
            .build()
        )
        .build()
    )


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--loads", type=int, default=2000)
    args = parser.parse_args()

    document: dict[str, Any] = read_document(EXAMPLE)
    assert load(document) == build_chain(), "the chain must build the example's configuration"
    documents = [copy.deepcopy(document) for _ in range(4)]  # no help from a warm dict

    loads, chains = [], []
    for round_ in range(args.rounds):
        doc = documents[round_ % len(documents)]
        loads.append(per_call_us(lambda doc=doc: load(doc), args.loads))  # type: ignore[misc]
        chains.append(per_call_us(build_chain, args.loads))
    load_us, chain_us = statistics.median(loads), statistics.median(chains)
    print(f"python {platform.python_version()} on {platform.machine()} ({platform.processor() or 'cpu'})")
    print(f"load() of examples/config.toml: {load_us:7.1f} us (median of {args.rounds} rounds of {args.loads})")
    print(f"same config through builders:   {chain_us:7.1f} us (ceiling, same run)")
    print(f"ratio load / ceiling:           {load_us / chain_us:7.2f}x")
    print(f"target at most 2.5x:            {'met' if load_us <= 2.5 * chain_us else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
