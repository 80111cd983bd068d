"""Ctrl-C at any step of making a storage (or a manager) leaks nothing, and Ctrl-C at any step of releasing one is
finished by calling ``close()`` again, without touching what was allocated meanwhile.

Each test first counts the system calls of one allocation (or release), then repeats it once per step, with a
KeyboardInterrupt injected before that call, or just after it returned (its result dropped, as when Ctrl-C arrives
during the call). After each try /proc/self/fd must show no new descriptor, the kernel must map no page of any mapping
made, and the directory must be empty. ``tests/fuzz/test_storage_interrupts.py`` draws the same at random; the CUDA
steps of the pinned and device tiers are interrupted in ``test_interrupts_gpu.py`` (GPU only).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from storage_cases import PinnedCpuSteps, still_usable
from syscalls import Holdings, Injected, Syscalls, nixl_still_holds

from kvbm_builder import (
    DiskAllocator,
    KvBlockManager,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    PinnedAllocator,
    SystemAllocator,
)
from kvbm_builder.storage import PinTuning, allocate_disk, allocate_system

MiB = 2**20
MODEL = KvManagerModelConfig.builder().num_layers(2).outer_dim(2).page_size(4).inner_dim(8).build()

pytestmark = pytest.mark.filterwarnings(
    "ignore::ResourceWarning", "ignore::kvbm_builder.storage.DiskReservationWarning"
)


def pinned_cpu_steps(threads: int, huge_pages: bool) -> PinnedCpuSteps:
    spec = PinnedAllocator(threads=threads, huge_pages=huge_pages)
    return PinnedCpuSteps(3 * MiB + 5, spec, PinTuning(populate_chunk_bytes=MiB))


@pytest.fixture(scope="module")
def agent() -> Any:
    nixl_api = pytest.importorskip("nixl._api")
    return nixl_api.nixl_agent(
        "interrupts", nixl_api.nixl_agent_config(enable_prog_thread=False, backends=["UCX", "POSIX"])
    )


def manager(directory: str, agent: Any = None) -> KvBlockManager:
    runtime = KvManagerRuntimeConfig.builder().worker_id(5)
    runtime = runtime.use_nixl_agent(agent) if agent is not None else runtime.disable_nixl()
    host = KvManagerLayoutConfig.builder().num_blocks(4).allocator(SystemAllocator())
    host = host.layout_type(LayerSeparate(outer_contiguous=False))
    disk = KvManagerLayoutConfig.builder().num_blocks(4).allocator(DiskAllocator(directory=directory))
    builder = KvBlockManager.builder().runtime(runtime.build()).model(MODEL)
    return builder.host_layout(host.build()).disk_layout(disk.build()).build()


#: name -> (make(directory, agent), calls refused with an errno)
CASES: dict[str, tuple[Callable[[str, Any], Any], dict[str, int]]] = {
    "system": (lambda d, a: allocate_system(3 * 4096 + 5), {}),
    "disk with O_DIRECT": (lambda d, a: allocate_disk(10_000, DiskAllocator(directory=d)), {}),
    "disk, buffered": (lambda d, a: allocate_disk(10_000, DiskAllocator(directory=d, o_direct=False)), {}),
    "disk, zero-filled": (
        lambda d, a: allocate_disk(10_000, DiskAllocator(directory=d, zerofill_fallback=True)),
        {"fallocate": errno.EOPNOTSUPP},
    ),
    "disk, truncated": (
        lambda d, a: allocate_disk(10_000, DiskAllocator(directory=d)),
        {"fallocate": errno.EOPNOTSUPP},
    ),
    "pinned CPU steps, 1 thread": (lambda d, a: pinned_cpu_steps(1, False), {}),
    "pinned CPU steps, 3 threads, huge pages": (lambda d, a: pinned_cpu_steps(3, True), {}),
    "manager": (lambda d, a: manager(d), {}),
    "manager with NIXL": (lambda d, a: manager(d, a), {}),
}


@pytest.fixture
def syscalls(request: pytest.FixtureRequest) -> Iterator[tuple[Syscalls, Any]]:
    case = request.node.callspec.params["case"]
    nixl_agent = request.getfixturevalue("agent") if "NIXL" in case else None
    extra = [(nixl_agent, "register_memory"), (nixl_agent, "deregister_memory")] if nixl_agent is not None else []
    with Syscalls(extra=extra, refuse=CASES[case][1]) as calls:
        yield calls, nixl_agent


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("case", list(CASES))
def test_an_interrupt_at_any_step_of_an_allocation_leaks_nothing(
    tmp_path: Path, syscalls: tuple[Syscalls, Any], case: str, when: str
) -> None:
    calls, agent = syscalls
    make = CASES[case][0]
    calls.plan(None)
    made = make(str(tmp_path), agent)
    steps = len(calls.calls)
    made.close()
    assert steps >= 2
    holdings = Holdings(str(tmp_path))
    interrupted = set()
    for at in range(1, steps + 1):
        calls.plan(at, when)
        with pytest.raises(Injected):
            make(str(tmp_path), agent)
        interrupted.add(calls.hit)
        assert holdings.leaks(calls) + nixl_still_holds(calls) == [], f"interrupted {when} call {at} ({calls.hit})"
    assert {"map_anonymous"} <= interrupted or {"open_new_file"} <= interrupted


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("case", list(CASES))
def test_an_interrupt_at_any_step_of_a_release_is_finished_by_closing_again(
    tmp_path: Path, syscalls: tuple[Syscalls, Any], case: str, when: str
) -> None:
    calls, agent = syscalls
    make = CASES[case][0]
    storage = make(str(tmp_path), agent)
    calls.plan(None)
    storage.close()
    steps = len(calls.calls)
    holdings = Holdings(str(tmp_path))
    for at in range(1, steps + 1):
        storage = make(str(tmp_path), agent)
        calls.plan(at, when)
        with pytest.raises(Injected):
            storage.close()
        calls.plan(None)
        newer = make(str(tmp_path), agent)  # may get the same address or descriptor number
        storage.close()  # finishes, and must not release any of the newer one's resources
        assert getattr(storage, "closed", True)
        still_usable(newer)
        newer.close()
        assert holdings.leaks(calls) + nixl_still_holds(calls) == [], f"interrupted {when} call {at} ({calls.hit})"
