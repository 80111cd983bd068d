"""Fuzz family "interrupts": Ctrl-C injected at a drawn step of making or of releasing a system, disk or manager
storage (NIXL on and off) or the CPU steps of a pinned one, before the call or as it returns.

Making: the KeyboardInterrupt reaches the caller and nothing is left (no file, descriptor, mapping, NIXL
registration). Releasing: the KeyboardInterrupt reaches the caller, a second ``close()`` finishes, and it touches
nothing of a storage made in between (which may have the same address or descriptor number). Every input in bounded
time. ``tests/test_interrupts.py`` walks every step of a few fixed cases; this draws sizes, flags, layouts and steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from budget import fuzz
from hypothesis import given
from hypothesis import strategies as st
from storage_cases import KINDS, Case, closed, still_usable, workspace
from syscalls import Holdings, Injected, Syscalls, nixl_still_holds, watchdog

from kvbm_builder.nixl import NixlRegistry


@pytest.fixture(scope="module")
def work() -> Iterator[tuple[Path, Any]]:
    with workspace("kvbm-fuzz-interrupts-", agent="storage-interrupts") as made:
        yield made


@fuzz()
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
    phase=st.sampled_from(["make", "release"]),
    when=st.sampled_from(["before", "after"]),
    step=st.floats(0, 1, exclude_max=True),
)
def test_an_interrupt_at_a_drawn_step_leaks_nothing_and_a_retried_close_finishes(
    work: tuple[Path, Any], kind: str, seed: int, phase: str, when: str, step: float
) -> None:
    root, agent = work
    case = Case(kind, seed, root, agent)
    extra = [(agent, "register_memory"), (agent, "deregister_memory")] if case.nixl else []
    with watchdog(60), Syscalls(extra=extra, refuse=case.refuse) as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ResourceWarning of what an interrupt dropped, DiskReservationWarning
        holdings = Holdings(str(root), empty=[str(root / "cache")])
        calls.plan(None)
        made = case.make()
        steps = len(calls.calls)
        if phase == "release":
            calls.plan(None)
            made.close()
            steps = len(calls.calls)
            made = case.make()
        else:
            made.close()
        at = 1 + int(step * steps)
        calls.plan(at, when)
        with pytest.raises(Injected):
            if phase == "make":
                made = case.make()
            else:
                made.close()
        calls.plan(None)
        if phase == "release":
            newer = case.make()  # may get the same address or descriptor number as what is half released
            made.close()
            assert closed(made)
            still_usable(newer)
            newer.close()
        del made
        assert holdings.leaks(calls) + nixl_still_holds(calls) == [], f"{case}: {when} step {at} ({calls.hit})"
        assert NixlRegistry.unreleased() == ()
