"""Ctrl-C at any step of a device or pinned allocation, CUDA steps included, leaks nothing (GPU only).

Like ``test_interrupts.py``, with cupy's allocations (``cupy.cuda.Memory``, ``cupy.cuda.PinnedMemory``) and
``cudaHostRegister`` / ``cudaHostUnregister`` wrapped too: after each interrupted try, CUDA must hold no registration
of the range, the device's free memory must be back, and every mapping and pinned buffer made must be gone.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from syscalls import Holdings, Injected, Syscalls

from kvbm_builder import PinnedAllocator, PinningMode
from kvbm_builder.storage import allocate_device, allocate_pinned

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

MiB = 2**20


@pytest.fixture(scope="module")
def cupy() -> Any:
    return pytest.importorskip("cupy")


def cuda_holds(cupy: Any, addr: int) -> bool:
    """Whether CUDA knows ``addr`` as pinned or device memory."""
    try:
        return int(cupy.cuda.runtime.pointerGetAttributes(addr).type) != 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return False


class Tracked:
    """The addresses of cupy allocations made while the wrapper is on: CUDA must hold none of them after a failed
    try. (cupy's Memory objects take no weak references, so CUDA itself is asked.)"""

    def __init__(self, cupy: Any) -> None:
        self.cupy = cupy
        self.made: list[int] = []

    def wrap(self, make: Callable[..., Any]) -> Callable[..., Any]:
        def tracked(*args: Any, **kwargs: Any) -> Any:
            memory = make(*args, **kwargs)
            self.made.append(int(memory.ptr))
            return memory

        return tracked

    def alive(self) -> list[int]:
        """Addresses made since the last call that CUDA still holds (then forgets them: they may be reused)."""
        gc.collect()
        held = [ptr for ptr in self.made if cuda_holds(self.cupy, ptr)]
        self.made.clear()
        return held


@pytest.fixture
def gpu_calls(cupy: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Syscalls, Tracked]]:
    tracked = Tracked(cupy)
    # tracked underneath the counting wrapper: an interrupt after the constructor drops a tracked object
    monkeypatch.setattr(cupy.cuda, "Memory", tracked.wrap(cupy.cuda.Memory))
    monkeypatch.setattr(cupy.cuda, "PinnedMemory", tracked.wrap(cupy.cuda.PinnedMemory))
    runtime = cupy.cuda.runtime
    extra = [(cupy.cuda, "Memory"), (cupy.cuda, "PinnedMemory"), (runtime, "hostRegister"), (runtime, "hostUnregister")]
    with Syscalls(extra=extra) as calls:
        yield calls, tracked


CASES: dict[str, Callable[[], Any]] = {
    "device": lambda: allocate_device(64 * MiB, 0),
    "pinned, register": lambda: allocate_pinned(8 * MiB + 5, PinnedAllocator(threads=2)),
    "pinned, register, huge pages": lambda: allocate_pinned(8 * MiB, PinnedAllocator(huge_pages=True)),
    "pinned, host_alloc": lambda: allocate_pinned(8 * MiB + 5, PinnedAllocator(mode=PinningMode.host_alloc)),
}


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("case", list(CASES))
def test_an_interrupt_at_any_cuda_or_host_step_leaks_nothing(
    cupy: Any, gpu_calls: tuple[Syscalls, Tracked], tmp_path: Path, case: str, when: str
) -> None:
    calls, tracked = gpu_calls
    make = CASES[case]
    calls.plan(None)
    made = make()
    steps = len(calls.calls)
    addr = made.addr
    made.close()
    del made
    assert not cuda_holds(cupy, addr)
    holdings = Holdings(str(tmp_path))  # after one allocation: CUDA opens its device files on first use
    free_before = cupy.cuda.runtime.memGetInfo()[0]
    hit = set()
    for at in range(1, steps + 1):
        calls.plan(at, when)
        with pytest.raises(Injected):
            make()
        hit.add(calls.hit)
        assert holdings.leaks(calls) == [], f"interrupted {when} call {at} ({calls.hit})"
        assert tracked.alive() == [], f"a cupy allocation outlived the interrupt at call {at} ({calls.hit})"
        for _ref, a, _n, _unmapped in calls.mappings:
            assert not cuda_holds(cupy, a), f"CUDA still holds 0x{a:x} after call {at} ({calls.hit})"
        assert cupy.cuda.runtime.memGetInfo()[0] >= free_before - 32 * MiB, f"device memory leaked at call {at}"
    cuda_step = {"Memory", "PinnedMemory", "hostRegister"} & hit
    assert cuda_step, f"no CUDA step was interrupted: {sorted(hit)}"


@pytest.mark.parametrize("case", ["pinned, register", "pinned, register, huge pages"])
def test_an_interrupted_release_of_pinned_memory_is_finished_by_closing_again(
    cupy: Any, gpu_calls: tuple[Syscalls, Tracked], tmp_path: Path, case: str
) -> None:
    """cudaHostUnregister and munmap interrupted, before or as they return. (Device and host_alloc memory is released
    by dropping cupy's owning object: no step of ours can be interrupted halfway.)"""
    calls, tracked = gpu_calls
    make = CASES[case]
    storage = make()
    calls.plan(None)
    storage.close()
    steps = len(calls.calls)
    assert steps >= 2  # cudaHostUnregister, munmap
    holdings = Holdings(str(tmp_path))
    for at in range(1, steps + 1):
        for when in ("before", "after"):
            storage = make()
            calls.plan(at, when)
            with pytest.raises(Injected):
                storage.close()
            calls.plan(None)
            newer = make()  # CUDA or the kernel may hand out the same address again
            storage.close()
            assert storage.closed
            view = newer.as_numpy()
            view[:3] = 7  # the retry released nothing of the newer storage
            assert int(view[:3].sum()) == 21
            del view
            assert cuda_holds(cupy, newer.addr)
            newer.close()
            assert holdings.leaks(calls) == [] and tracked.alive() == []
