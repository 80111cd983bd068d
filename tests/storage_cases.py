"""What the interrupt and fault tests allocate: a storage or a manager described by a seed, made and released the
same way every time, so that the calls of one making or release can be counted and then one of them hit; and the
working directory a fuzz module runs in."""

from __future__ import annotations

import errno
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from syscalls import frozen_heap

from kvbm_builder import (
    DiskAllocator,
    FullyContiguous,
    KvBlockManager,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    PinnedAllocator,
    SystemAllocator,
)
from kvbm_builder.storage import PinTuning, allocate_disk, allocate_system, pinned

MiB = 2**20
KINDS = ("system", "disk", "pinned-cpu", "manager")


@contextmanager
def workspace(
    prefix: str, subdirs: tuple[str, ...] = ("cache",), agent: str | None = None
) -> Iterator[tuple[Path, Any]]:
    """A temporary directory with ``subdirs`` made, as the working directory, and (when ``agent`` names one and nixl is
    installed) a caller's NIXL agent with UCX and POSIX, for a whole fuzz module; the heap is frozen meanwhile."""
    made = None
    if agent is not None:
        try:
            from nixl._api import nixl_agent, nixl_agent_config

            # no progress thread: it spins a whole core for as long as the agent lives
            made = nixl_agent(agent, nixl_agent_config(enable_prog_thread=False, backends=["UCX", "POSIX"]))
        except ImportError:
            pass
    with tempfile.TemporaryDirectory(prefix=prefix) as base:
        root = Path(base)
        for name in subdirs:
            (root / name).mkdir(parents=True)
        cwd = os.getcwd()
        os.chdir(root)
        try:
            with frozen_heap():
                yield root, made
        finally:
            os.chdir(cwd)


class PinnedCpuSteps:
    """Register mode's steps before CUDA (map, NUMA placement, populate), which run without a GPU."""

    def __init__(self, size: int, spec: PinnedAllocator, tuning: PinTuning) -> None:
        self.mapped = pinned._map_and_populate(size, spec, tuning)

    @property
    def closed(self) -> bool:
        return self.mapped.mapping.unmapped

    def close(self) -> None:
        self.mapped.mapping.unmap()


class Case:
    """``kind`` made from ``seed``: sizes, flags, layouts. ``refuse``: calls that fail with an errno every time (the
    file system without fallocate)."""

    def __init__(self, kind: str, seed: int, root: Path, agent: Any) -> None:
        rng = random.Random(seed)
        self.kind, self.root, self.agent = kind, root, agent
        self.refuse: dict[str, int] = {}
        self.size = rng.randint(1, 3 * MiB if kind == "pinned-cpu" else 40_000)
        self.o_direct = rng.random() < 0.5
        self.zerofill = rng.random() < 0.5
        self.relative = rng.random() < 0.5
        if kind == "disk" and rng.random() < 0.3:
            self.refuse["fallocate"] = errno.EOPNOTSUPP
        self.threads = rng.randint(1, 3)
        self.huge_pages = rng.random() < 0.3
        self.thp = rng.random() < 0.5
        self.chunk = rng.choice([4096, 64 * 1024, MiB])
        self.nixl = agent is not None and rng.random() < 0.5
        self.layout = rng.choice([FullyContiguous(), LayerSeparate(True), LayerSeparate(False)])
        self.blocks = (rng.randint(1, 4), rng.randint(1, 4))
        self.layers = rng.randint(1, 3)

    @property
    def directory(self) -> str:
        return "cache" if self.relative else str(self.root / "cache")

    def make(self) -> Any:
        if self.kind == "system":
            return allocate_system(self.size)
        if self.kind == "disk":
            spec = DiskAllocator(directory=self.directory, o_direct=self.o_direct, zerofill_fallback=self.zerofill)
            return allocate_disk(self.size, spec)
        if self.kind == "pinned-cpu":
            spec = PinnedAllocator(threads=self.threads, huge_pages=self.huge_pages)
            tuning = PinTuning(populate_chunk_bytes=self.chunk, transparent_huge_pages=self.thp)
            return PinnedCpuSteps(self.size, spec, tuning)
        return self.manager()

    def manager(self, host_allocator: Any = None, disk_allocator: Any = None) -> KvBlockManager:
        model = KvManagerModelConfig.builder().num_layers(self.layers).outer_dim(2).page_size(4).inner_dim(8).build()
        runtime = KvManagerRuntimeConfig.builder().worker_id(1)
        runtime = runtime.use_nixl_agent(self.agent) if self.nixl else runtime.disable_nixl()
        host = KvManagerLayoutConfig.builder().num_blocks(self.blocks[0]).layout_type(self.layout)
        host = host.allocator(host_allocator or SystemAllocator())
        disk = KvManagerLayoutConfig.builder().num_blocks(self.blocks[1])
        disk = disk.allocator(disk_allocator or DiskAllocator(directory=self.directory, o_direct=self.o_direct))
        builder = KvBlockManager.builder().runtime(runtime.build()).model(model)
        return builder.host_layout(host.build()).disk_layout(disk.build()).build()

    def __repr__(self) -> str:
        return f"Case({self.kind}, size={self.size}, nixl={self.nixl}, refuse={self.refuse})"


def storages_of(thing: Any) -> list[Any]:
    if isinstance(thing, KvBlockManager):
        return [s for tier in thing.tiers.values() for s in tier.storages]
    if isinstance(thing, PinnedCpuSteps):
        return []
    return [thing]


def still_usable(thing: Any) -> None:
    """Every storage of ``thing`` still holds what is written to it (nothing of it was released by mistake)."""
    if isinstance(thing, PinnedCpuSteps):
        mapping = thing.mapped.mapping
        assert not mapping.unmapped and mapping.memory is not None
        mapping.memory[mapping.offset : mapping.offset + 3] = b"abc"
        assert mapping.memory[mapping.offset : mapping.offset + 3] == b"abc"
        return
    for storage in storages_of(thing):
        if hasattr(storage, "write"):
            storage.write(0, b"abc")
            out = bytearray(3)
            storage.read_into(0, out)
            assert out == b"abc"
            assert os.path.exists(storage.path)
        else:
            view = storage.as_numpy()
            view[:3] = 7
            assert view[:3].tolist() == [7, 7, 7]
            del view


def closed(thing: Any) -> bool:
    return bool(getattr(thing, "closed", False))
