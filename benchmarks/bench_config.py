"""How long one full configuration chain takes through the builders, against a ceiling measured in the same run.

A *chain* builds a whole ``KvBlockManagerConfig`` the way a user writes it: a runtime config, a model config,
three tier layouts (``DeviceAllocator``, ``PinnedAllocator``, ``DiskAllocator``), the consolidator setter, then
the manager config; every builder validates every rule at ``build()``.

The *ceiling* makes the same twelve objects (eleven frozen attrs configs and the cancellation token) with no
validation and no builder at all: ``object.__new__`` plus ``object.__setattr__`` per field (what attrs' own
``__init__`` boils down to for a frozen class). It is the cost of merely making the objects; the ratio says what
the builders and the checks add.

Run: ``python benchmarks/bench_config.py [--rounds 20] [--chains 1000]``. Prints the median of the rounds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import attrs

from kvbm_builder.config import (
    DeviceAllocator,
    DiskAllocator,
    EventSource,
    FullyContiguous,
    KvBlockManagerConfig,
    KvEventConsolidatorConfig,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    NixlOptions,
    PinnedAllocator,
)
from kvbm_builder.config.consolidator import ConsolidatorMode
from kvbm_builder.config.runtime import CancellationToken


def build_chain(registry: Any) -> KvBlockManagerConfig:
    """One full chain through the builders. The registry is shared, as an application shares one."""
    runtime = KvManagerRuntimeConfig.builder().worker_id(7).disable_nixl().metrics_registry(registry).build()
    model = (
        KvManagerModelConfig.builder().num_layers(28).outer_dim(2).page_size(16).inner_dim(1024).dtype_width_bytes(2)
    ).build()
    device = KvManagerLayoutConfig.builder().num_blocks(1024).allocator(DeviceAllocator(device_id=0)).build()
    host = (
        KvManagerLayoutConfig.builder()
        .num_blocks(4096)
        .layout_type(LayerSeparate(outer_contiguous=True))
        .allocator(PinnedAllocator(device_id=0))
        .build()
    )
    disk = KvManagerLayoutConfig.builder().num_blocks(16384).allocator(DiskAllocator(directory="/var/cache/kv")).build()
    return (
        KvBlockManagerConfig.builder()
        .runtime(runtime)
        .model(model)
        .device_layout(device)
        .host_layout(host)
        .disk_layout(disk)
        .consolidator_config("tcp://localhost:5557", "tcp://*:5558", EventSource.Vllm)
        .build()
    )


def _raw(cls: type, **fields: Any) -> Any:
    """A frozen attrs instance with no __init__, no validator and no builder."""
    obj: Any = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


# the layouts' default: one frozen instance, which the chain's device and disk layouts share as well
FULLY_CONTIGUOUS = FullyContiguous()


def build_ceiling(registry: Any) -> Any:
    """The same twelve objects, made directly: the least any construction of them can cost."""
    runtime = _raw(
        KvManagerRuntimeConfig,
        worker_id=7,
        cancellation_token=CancellationToken(),
        nixl=NixlOptions.DISABLED,
        async_runtime=None,
        metrics_registry=registry,
    )
    model = _raw(KvManagerModelConfig, num_layers=28, outer_dim=2, page_size=16, inner_dim=1024, dtype_width_bytes=2)

    def layout(num_blocks: int, layout_type: Any, allocator: Any) -> Any:
        return _raw(
            KvManagerLayoutConfig,
            num_blocks=num_blocks,
            layout_type=layout_type,
            storage=None,
            allocator=allocator,
            logical=None,
            offload_filter=None,
            alignment=1,
        )

    device = layout(1024, FULLY_CONTIGUOUS, _raw(DeviceAllocator, device_id=0))
    host = layout(
        4096,
        _raw(LayerSeparate, outer_contiguous=True),
        _raw(
            PinnedAllocator,
            device_id=0,
            mode=PinnedAllocator.__attrs_attrs__.mode.default,
            huge_pages=False,
            numa=False,
            threads=None,
            progress=None,
        ),
    )
    disk = layout(
        16384,
        FULLY_CONTIGUOUS,
        _raw(DiskAllocator, directory="/var/cache/kv", o_direct=True, zerofill_fallback=False),
    )
    consolidator = _raw(
        KvEventConsolidatorConfig,
        engine_event_endpoint="tcp://localhost:5557",
        consolidated_event_endpoint="tcp://*:5558",
        engine_source=EventSource.Vllm,
        mode=ConsolidatorMode.dedup,
    )
    return _raw(
        KvBlockManagerConfig,
        runtime=runtime,
        model=model,
        device_layout=device,
        host_layout=host,
        disk_layout=disk,
        event_manager=None,
        block_reset_channel=None,
        kvbm_metrics=None,
        consolidator_config=consolidator,
    )


def ns_per_chain(make: Callable[[Any], Any], registry: Any, chains: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(chains):
        make(registry)
    return (time.perf_counter_ns() - start) / chains


def medians(registry: Any, rounds: int, chains: int) -> tuple[float, float]:
    """Median ns per chain of the builders and of the ceiling; rounds alternate so both see the same machine."""
    chain: list[float] = []
    ceiling: list[float] = []
    for _ in range(rounds):
        chain.append(ns_per_chain(build_chain, registry, chains))
        ceiling.append(ns_per_chain(build_ceiling, registry, chains))
    return statistics.median(chain), statistics.median(ceiling)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--chains", type=int, default=1000)
    args = parser.parse_args()

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    # the two ways must make the same configuration, or the comparison means nothing
    built, raw = build_chain(registry), build_ceiling(registry)
    if attrs.asdict(built, recurse=False).keys() != attrs.asdict(raw, recurse=False).keys() or built != raw:
        raise SystemExit("the ceiling must describe the same configuration as the chain")

    ns_per_chain(build_chain, registry, args.chains)  # warm up: first-use caches, allocator pools
    chain_ns, ceiling_ns = medians(registry, args.rounds, args.chains)
    print(f"python {platform.python_version()} on {platform.machine()}; {args.rounds} rounds x {args.chains} chains")
    print(f"full builder chain (12 objects, every rule checked): {chain_ns / 1000:8.2f} us per chain (median)")
    print(f"ceiling: same objects via object.__new__ + object.__setattr__, no checks: {ceiling_ns / 1000:8.2f} us")
    print(
        f"ratio chain / ceiling: {chain_ns / ceiling_ns:.1f}x; target < 60 us per chain: "
        f"{'met' if chain_ns < 60_000 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
