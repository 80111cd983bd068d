"""Fuzz family "manager programs": a KvBlockManager with a system-memory host tier and a disk tier (any layout,
alignment, model shape and dtype width; a relative or absolute disk directory; NIXL off, or on with a caller's
agent), then random operations: blocks written and read through views of every numeric dtype, copied between the
tiers by plain file I/O and by NIXL transfers, views and regions asked for wrongly, views kept past ``close()``, the
manager closed or dropped unclosed (garbage-collected), ``os.chdir``.

Every input must keep every byte (the model of each region matches what the tiers hold, also through views that
outlived the manager), raise nothing but the KvbmErrors the model expects, finish in bounded time, leave no file,
descriptor or mapping behind, and leave NIXL holding nothing.
"""

from __future__ import annotations

import gc
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from budget import fuzz
from hypothesis import given
from hypothesis import strategies as st
from storage_cases import workspace
from syscalls import Holdings, Syscalls, nixl_still_holds, watchdog

from kvbm_builder import (
    DiskAllocator,
    FullyContiguous,
    KvBlockManager,
    KvbmError,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    LayoutError,
    SystemAllocator,
)
from kvbm_builder.nixl import NixlRegistry
from kvbm_builder.storage import StorageClosedError

NUMERIC = {1: ["u1", "i1"], 2: ["u2", "i2", "f2"], 4: ["u4", "i4", "f4"], 8: ["u8", "i8", "f8", "c8"]}
NOT_NUMERIC = [object, "M8[s]", "?", "U1", "S1", [("a", "u1")], "V1"]


@pytest.fixture(scope="module")
def work() -> Iterator[tuple[Path, Any]]:
    """A directory with ``d0/cache`` and ``d1/cache``, and a caller's NIXL agent (UCX, POSIX) when nixl is there."""
    with workspace("kvbm-fuzz-manager-", ("d0/cache", "d1/cache"), agent="fuzz-manager") as made:
        yield made


def piece(views: list[Any], layout: Any, block: int, layer: int, outer: int) -> Any:
    """The [page_size, inner_dim] array of one region, out of a tier's views."""
    if isinstance(layout, FullyContiguous):
        return views[0][block, layer, outer]
    if layout.outer_contiguous:
        return views[layer][outer, block]
    return views[layer][block, outer]


class Program:
    def __init__(self, root: Path, agent: Any, rng: random.Random) -> None:
        self.root, self.agent, self.rng = root, agent, rng
        os.chdir(root / self.rng.choice(["d0", "d1"]))
        width = rng.choice([1, 2, 4, 8])
        self.model_config = (
            KvManagerModelConfig.builder()
            .num_layers(rng.randint(1, 3))
            .outer_dim(rng.randint(1, 2))
            .page_size(rng.randint(1, 6))
            .inner_dim(rng.randint(1, 12))
            .dtype_width_bytes(width)
            .build()
        )
        self.width = width
        self.layout = rng.choice([FullyContiguous(), LayerSeparate(True), LayerSeparate(False)])
        self.nixl = agent is not None and rng.random() < 0.5
        self.o_direct = rng.random() < 0.5
        relative = rng.random() < 0.5
        runtime = KvManagerRuntimeConfig.builder().worker_id(rng.randint(0, 9))
        runtime = runtime.use_nixl_agent(agent) if self.nixl else runtime.disable_nixl()
        self.host_blocks, self.disk_blocks = rng.randint(1, 5), rng.randint(1, 5)
        host = KvManagerLayoutConfig.builder().num_blocks(self.host_blocks).allocator(SystemAllocator())
        host = host.layout_type(self.layout).alignment(rng.choice([1, 2, 64, 256, 4096]))
        directory = "cache" if relative else str(root / "d1" / "cache")
        disk = KvManagerLayoutConfig.builder().num_blocks(self.disk_blocks).alignment(rng.choice([1, 4096]))
        disk = disk.allocator(DiskAllocator(directory=directory, o_direct=self.o_direct))
        self.manager: KvBlockManager | None = (
            KvBlockManager.builder()
            .runtime(runtime.build())
            .model(self.model_config)
            .host_layout(host.build())
            .disk_layout(disk.build())
            .build()
        )
        self.host = self.manager.tier("G2")
        self.disk = self.manager.tier("G3")
        self.region_bytes = self.model_config.region_bytes
        self.model: dict[tuple[str, int, int, int], bytes] = {}
        self.kept: list[tuple[Any, tuple[int, int, int]]] = []  # (uint8 region view, region) kept by the program
        self.closed = False

    # -- helpers -----------------------------------------------------------------------------------------------

    def region(self, tier: str) -> tuple[int, int, int]:
        blocks = self.host_blocks if tier == "G2" else self.disk_blocks
        mc = self.model_config
        return self.rng.randrange(blocks), self.rng.randrange(mc.num_layers), self.rng.randrange(mc.outer_dim)

    def expected(self, tier: str, region: tuple[int, int, int]) -> bytes:
        return self.model.get((tier, *region), bytes(self.region_bytes))

    def host_piece(self, region: tuple[int, int, int]) -> Any:
        dtype = self.rng.choice(NUMERIC[self.width])
        array = piece(self.host.views(dtype=dtype), self.layout, *region)
        return array.view(np.uint8).reshape(-1)

    def refused_when_closed(self, action: Any) -> bool:
        """Run ``action``; True when it was refused because the manager is closed (as the model says it must be)."""
        try:
            action()
        except StorageClosedError:
            assert self.closed, "a live manager refused as if closed"
            return True
        assert not self.closed, "a closed manager's tier was usable"
        return False

    # -- operations ------------------------------------------------------------------------------------------

    def write_host(self) -> None:
        region = self.region("G2")
        data = self.rng.randbytes(self.region_bytes)

        def write() -> None:
            self.host_piece(region)[:] = np.frombuffer(data, np.uint8)

        if not self.refused_when_closed(write):
            self.model[("G2", *region)] = data

    def read_host(self) -> None:
        region = self.region("G2")

        def read() -> None:
            assert self.host_piece(region).tobytes() == self.expected("G2", region)

        self.refused_when_closed(read)

    def copy(self) -> None:
        """Host region <-> disk region by the disk storage's write() / read_into()."""
        to_disk = self.rng.random() < 0.5
        src, dst = self.region("G2"), self.region("G3")

        def copy() -> None:
            (file,) = self.disk.storages
            offset = self.disk.memory_region(*dst).addr
            host = self.host_piece(src)
            if to_disk:
                file.write(offset, host)
            else:
                file.read_into(offset, host)

        if not self.refused_when_closed(copy):
            if to_disk:
                self.model[("G3", *dst)] = self.expected("G2", src)
            else:
                self.model[("G2", *src)] = self.expected("G3", dst)

    def transfer(self) -> None:
        """Host region <-> disk region by a NIXL POSIX transfer (when NIXL is on)."""
        if not self.nixl or self.closed:
            return
        src, dst = self.region("G2"), self.region("G3")
        host = self.host.memory_region(*src)
        file_offset = self.disk.memory_region(*dst).addr
        aligned = host.addr % 4096 == 0 and file_offset % 4096 == 0 and host.size % 4096 == 0
        if self.o_direct and not aligned:  # NIXL's POSIX backend does no bounce: O_DIRECT needs alignment
            return
        op = self.rng.choice(["WRITE", "READ"])
        (file,) = self.disk.storages
        agent = self.agent
        local = agent.get_xfer_descs([(host.addr, host.size, 0)], "DRAM")
        remote = agent.get_xfer_descs([(file_offset, host.size, file.fd)], "FILE")
        handle = agent.initialize_xfer(op, local, remote, agent.name, backends=["POSIX"])
        try:
            state = agent.transfer(handle)
            while state == "PROC":
                state = agent.check_xfer_state(handle)
            assert state == "DONE", state
        finally:
            handle.release()
        if op == "WRITE":
            self.model[("G3", *dst)] = self.expected("G2", src)
        else:
            self.model[("G2", *src)] = self.expected("G3", dst)

    def bad_view(self) -> None:
        dtype = self.rng.choice([*NOT_NUMERIC, "f4" if self.width != 4 else "f2", "float17"])
        try:
            self.host.views(dtype=dtype)
        except StorageClosedError:
            assert self.closed
        except LayoutError:
            pass
        else:
            raise AssertionError(f"views(dtype={dtype!r}) was accepted for a width of {self.width}")

    def bad_region(self) -> None:
        if self.closed:
            return
        mc = self.model_config
        block, layer, outer = self.rng.choice(
            [(self.host_blocks, 0, 0), (0, mc.num_layers, 0), (0, 0, mc.outer_dim), (-1, 0, 0), (2**70, 0, 0)]
        )
        try:
            self.host.memory_region(block, layer, outer)
        except KvbmError:
            return
        raise AssertionError(f"memory_region({block}, {layer}, {outer}) was accepted")

    def keep_view(self) -> None:
        region = self.region("G2")
        try:
            self.kept.append((self.host_piece(region), region))
        except StorageClosedError:
            assert self.closed

    def use_kept(self) -> None:
        """Write and read through a view kept from before: also after close() or collection of the manager."""
        if not self.kept:
            return
        view, region = self.rng.choice(self.kept)
        assert view.tobytes() == self.expected("G2", region)
        data = self.rng.randbytes(self.region_bytes)
        view[:] = np.frombuffer(data, np.uint8)
        self.model[("G2", *region)] = data
        for other, other_region in self.kept:  # every kept view of that region sees it
            assert other.tobytes() == self.expected("G2", other_region)

    def drop_kept(self) -> None:
        if self.kept:
            self.kept.pop(self.rng.randrange(len(self.kept)))

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
            assert self.manager.closed
        self.closed = True

    def drop_unclosed(self) -> None:
        """Forget the manager without close(): the collector closes it; kept views still work."""
        if self.manager is None:
            return
        self.manager = None
        gc.collect()
        self.closed = True
        assert all(s.closed for s in self.host.storages + self.disk.storages)

    def chdir(self) -> None:
        os.chdir(self.root / self.rng.choice(["d0", "d1"]))

    def finish(self) -> None:
        if self.manager is not None:
            self.manager.close()
        for view, region in self.kept:
            assert view.tobytes() == self.expected("G2", region)
        self.kept.clear()


OPERATIONS = [
    "write_host",
    "read_host",
    "copy",
    "transfer",
    "bad_view",
    "bad_region",
    "keep_view",
    "use_kept",
    "drop_kept",
    "close",
    "drop_unclosed",
    "chdir",
]
SEEDS = st.integers(0, 2**32 - 1)


@fuzz()
@given(first=SEEDS, operations=st.lists(st.tuples(st.sampled_from(OPERATIONS), SEEDS), max_size=16))
def test_manager_programs_keep_every_byte_and_leak_nothing(
    work: tuple[Path, Any], first: int, operations: list[tuple[str, int]]
) -> None:
    root, agent = work
    cwd = os.getcwd()
    extra = [(agent, "register_memory")] if agent is not None else []
    with watchdog(60), Syscalls(extra=extra) as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        holdings = Holdings(str(root), empty=[str(root / "d0" / "cache"), str(root / "d1" / "cache")])
        rng = random.Random(first)
        program = Program(root, agent, rng)
        try:
            for name, seed in operations:
                rng.seed(seed)
                getattr(program, name)()
            program.finish()
        finally:
            os.chdir(cwd)
            if program.manager is not None:
                program.manager.close()
        del program
        assert holdings.leaks(calls) + nixl_still_holds(calls) == []
        assert NixlRegistry.unreleased() == ()
