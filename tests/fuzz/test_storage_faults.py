"""Fuzz families of faults: a system call of the storages failing with a drawn errno at a drawn step (making or
releasing), NIXL refusing to register or deregister (at a drawn call, for a drawn number of tries), and a caller's
allocator failing at a drawn allocation with a drawn exception.

In each, the caller sees success or a KvbmError (never a bare OSError or RuntimeError); after a failed release a
retried ``close()`` finishes; what NIXL still holds is kept (its memory mapped, its file present, also when the
manager is garbage-collected) until the registry can let go; and at the end nothing is left: no file, descriptor,
mapping or NIXL registration. Every input in bounded time.
"""

from __future__ import annotations

import errno
import gc
import os
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from budget import fuzz
from hypothesis import given
from hypothesis import strategies as st
from storage_cases import KINDS, Case, closed, workspace
from syscalls import Holdings, Syscalls, any_page_mapped, nixl_still_holds, os_error, watchdog

from kvbm_builder import DiskAllocator, KvbmError, SystemAllocator
from kvbm_builder.manager import ReleaseError
from kvbm_builder.nixl import NixlRegistry
from kvbm_builder.testing import FailingAllocator

#: the calls that can fail with an errno, and errnos they fail with in the wild
FAULTS: dict[str, list[int]] = {
    "map_anonymous": [errno.ENOMEM, errno.EINVAL, errno.EAGAIN, errno.EPERM],
    "madvise": [errno.EINVAL, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.EPERM, errno.EFAULT],
    "mbind": [errno.EINVAL, errno.EPERM, errno.EFAULT, errno.EIO],
    "fallocate": [errno.ENOSPC, errno.EDQUOT, errno.EOPNOTSUPP, errno.ENOSYS, errno.EFBIG, errno.EIO, errno.EINTR],
    "open_new_file": [errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EMFILE, errno.ENAMETOOLONG, errno.EEXIST],
    "set_o_direct": [errno.EINVAL, errno.EPERM],
    "close_file": [errno.EIO, errno.EINTR, errno.ENOSPC],
    "pwrite": [errno.ENOSPC, errno.EIO, errno.EINVAL, errno.EDQUOT, errno.EFBIG],
    "preadv": [errno.EIO, errno.EINVAL],
    "ftruncate": [errno.EIO, errno.EFBIG, errno.EPERM],
    "unlink": [errno.EBUSY, errno.EPERM, errno.EACCES, errno.EROFS, errno.EIO],
    "statvfs": [errno.EIO, errno.ENOSYS],
}


@pytest.fixture(scope="module")
def work() -> Iterator[tuple[Path, Any]]:
    with workspace("kvbm-fuzz-faults-", agent="storage-faults") as made:
        yield made


def only_kvbm_errors(action: Callable[[], Any]) -> tuple[Any, KvbmError | None]:
    """``action()``'s result, or the KvbmError it raised; anything else propagates (a finding)."""
    try:
        return action(), None
    except KvbmError as exc:
        return None, exc


@fuzz()
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
    phase=st.sampled_from(["make", "release"]),
    step=st.floats(0, 1, exclude_max=True),
    pick=st.integers(0, 2**16),
)
def test_a_failing_system_call_is_a_kvbm_error_and_leaks_nothing(
    work: tuple[Path, Any], kind: str, seed: int, phase: str, step: float, pick: int
) -> None:
    root, agent = work
    case = Case(kind, seed, root, agent)
    extra = [(agent, "register_memory")] if case.nixl else []
    with watchdog(60), Syscalls(extra=extra, refuse=case.refuse) as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        holdings = Holdings(str(root), empty=[str(root / "cache")])
        # count the calls of this phase, and pick a drawn one among those that can fail
        calls.plan(None)
        made = case.make()
        names = list(calls.calls)
        calls.plan(None)
        made.close()
        if phase == "release":
            names = list(calls.calls)
            made = case.make()
        faultable = [i for i, name in enumerate(names, 1) if name in FAULTS]
        if not faultable:  # nothing of this phase can fail with an errno (a manager's release of views, say)
            if phase == "release":
                made.close()
            del made
            assert holdings.leaks(calls) == []
            return
        at = faultable[int(step * len(faultable))]
        code = FAULTS[names[at - 1]][pick % len(FAULTS[names[at - 1]])]
        calls.plan(at, "before", os_error(code, names[at - 1]))
        if phase == "make":
            made, error = only_kvbm_errors(case.make)
        else:
            _, error = only_kvbm_errors(made.close)
        calls.plan(None)
        if made is not None:
            if error is not None:  # a release that failed names the step, stays open, and finishes when retried
                assert not closed(made), f"{case}: closed after a failed release"
            made.close()
            assert closed(made)
        del made
        assert holdings.leaks(calls) + nixl_still_holds(calls) == [], f"{case}: {names[at - 1]} {code} ({error})"
        assert NixlRegistry.unreleased() == ()


class FlakyAgent:
    """Refuses ``method`` of a NIXL agent from its ``at``-th call on, ``times`` times (then works again)."""

    def __init__(self, agent: Any, method: str, at: int, times: int) -> None:
        self.agent, self.method, self.at, self.times = agent, method, at, times
        self.real = getattr(agent, method)
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.at <= self.calls < self.at + self.times:
            raise RuntimeError(f"injected: NIXL_ERR_BACKEND in {self.method} (call {self.calls})")
        return self.real(*args, **kwargs)

    def __enter__(self) -> FlakyAgent:
        setattr(self.agent, self.method, self)
        return self

    def heal(self) -> None:
        self.times = 0

    def __exit__(self, *exc: object) -> None:
        setattr(self.agent, self.method, self.real)


@fuzz()
@given(
    seed=st.integers(0, 2**32 - 1),
    method=st.sampled_from(["register_memory", "deregister_memory", "get_reg_descs"]),
    at=st.integers(1, 12),
    times=st.sampled_from([1, 2, 3, 1000]),
    drop=st.booleans(),
)
def test_nixl_faults_are_kvbm_errors_and_registered_memory_is_never_freed(
    work: tuple[Path, Any], seed: int, method: str, at: int, times: int, drop: bool
) -> None:
    """NIXL refuses a call, ``times`` times from the ``at``-th: bring-up and close say so with a KvbmError; memory NIXL
    still holds stays allocated (also after the manager is dropped unclosed and collected) until NIXL lets go."""
    root, agent = work
    if agent is None:
        pytest.skip("nixl is not installed")
    case = Case("manager", seed, root, agent)
    case.nixl = True
    with watchdog(60), Syscalls(extra=[(agent, "register_memory")]) as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        holdings = Holdings(str(root), empty=[str(root / "cache")])
        with FlakyAgent(agent, method, at, times) as flaky:
            manager, error = only_kvbm_errors(case.manager)
            held: list[Any] = []
            if error is not None:  # the bring-up failed: what NIXL kept is named on the error, and still allocated
                release = getattr(error, "release_error", None)
                if release is not None:
                    assert isinstance(release, ReleaseError) and release.unreleased
                    held = list(release.unreleased)
                    manager = release.manager
            else:
                _, error = only_kvbm_errors(manager.close)
                if error is not None:
                    assert isinstance(error, ReleaseError) and not manager.closed
                    held = list(error.unreleased)
            ids = [id(s) for s in held]
            addrs = {id(s): (s.addr, s.size) for s in held if not hasattr(s, "path")}
            paths = {id(s): s.path for s in held if hasattr(s, "path")}
            if drop and manager is not None:  # forget it: the collector must not free what NIXL still holds
                del manager, error, held
                manager = None
                gc.collect()
            registries = list(NixlRegistry.unreleased()) + ([manager._nixl] if manager is not None else [])
            still = {id(r.storage) for registry in registries if registry is not None for r in registry.registrations}
            for i in set(ids) & still:
                if i in addrs:
                    assert any_page_mapped(*addrs[i]), "memory NIXL holds was unmapped"
                else:
                    assert os.path.exists(paths[i]), "a file NIXL holds was removed"
            flaky.heal()
            if manager is not None:
                manager.close()
                assert manager.closed
            for registry in NixlRegistry.unreleased():  # a dropped manager's registry: close it now
                registry.close()
            del manager
        assert NixlRegistry.unreleased() == ()
        assert holdings.leaks(calls) + nixl_still_holds(calls) == []


@fuzz()
@given(
    seed=st.integers(0, 2**32 - 1),
    tier=st.sampled_from(["host", "disk"]),
    fail_at=st.integers(1, 4),
    error=st.sampled_from(
        [OSError(errno.ENOSPC, "No space left"), MemoryError(), ValueError("bad size"), RuntimeError("lost device")]
    ),
)
def test_a_failing_allocator_is_a_kvbm_error_and_everything_made_is_released(
    work: tuple[Path, Any], seed: int, tier: str, fail_at: int, error: BaseException
) -> None:
    root, agent = work
    case = Case("manager", seed, root, agent)
    with watchdog(60), Syscalls() as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        holdings = Holdings(str(root), empty=[str(root / "cache")])
        inner = SystemAllocator() if tier == "host" else DiskAllocator(directory=case.directory)
        failing = FailingAllocator(inner, fail_at=fail_at, error=error)
        host, disk = (failing, None) if tier == "host" else (None, failing)
        made, raised = only_kvbm_errors(partial(case.manager, host, disk))
        if made is not None:
            assert failing.calls < fail_at  # it never reached the failing call
            made.close()
        else:
            assert raised is not None and type(error).__name__ in str(raised)
        assert all(closed(s) for s in failing.made)
        del made, failing, host, disk
        assert holdings.leaks(calls) == []
