"""The system calls the storage layer makes, wrapped: counted, and the Nth one interrupted or failed; and what this
process holds, asked of the kernel, to show that nothing leaked: descriptors from /proc/self/fd before and after an
input, and each mapping the storages make checked with mincore(2) the moment its owner unmaps it or is collected
(every mapping made must be released by the end of the input).

Every call the storages make to the system goes through ``kvbm_builder.storage._libc`` (mappings and files come back
as owning objects made in C: ``mmap.mmap``, ``io.FileIO``) or through a few ``os`` functions; :class:`Syscalls`
wraps all of them (and, on request, NIXL agent methods and cupy's allocations). An interrupt is injected the way
Ctrl-C arrives: ``before`` the call, or ``after`` it returned, its result dropped (CPython raises a pending
KeyboardInterrupt as soon as a call returns). Only calls on the thread that armed the plan count: Ctrl-C is raised
in the main thread.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from kvbm_builder.storage import _libc

#: every system call the storages make: the _libc functions and the os functions the disk tier calls
LIBC_CALLS = (
    "map_anonymous",
    "address_of",
    "close_mapping",
    "open_new_file",
    "close_file",
    "set_o_direct",
    "madvise",
    "memset",
    "fallocate",
    "mbind",
)
OS_CALLS = ("pwrite", "preadv", "ftruncate", "unlink", "statvfs")


class Injected(KeyboardInterrupt):
    """The interrupt a test injected (a KeyboardInterrupt, as Ctrl-C raises)."""


class Syscalls:
    """Wraps the calls while active (a context manager). ``plan(at, when, error)`` makes call number ``at`` (1-based,
    counted from the plan) raise ``error`` (default: :class:`Injected`) ``"before"`` or ``"after"`` it runs.
    ``refuse`` maps call names to an errno that call always fails with (a file system without fallocate, say).

    Every mapping made is tracked; the moment one is unmapped (closed, or collected) the kernel is asked whether any
    page of it is still mapped: each one is a finding in ``problems``."""

    def __init__(
        self,
        extra: Sequence[tuple[object, str]] = (),
        refuse: dict[str, int] | None = None,
    ) -> None:
        self._targets: list[tuple[object, str]] = [(_libc, n) for n in LIBC_CALLS] + [(os, n) for n in OS_CALLS]
        self._targets += list(extra)
        self._saved: list[tuple[object, str, Any]] = []
        self._refuse = dict(refuse or {})
        self._thread: threading.Thread | None = None
        self._at: int | None = None
        self._when = "after"
        self._error: Callable[[], BaseException] = Injected
        self.calls: list[str] = []  # names of the counted calls since the last plan
        self.hit: str | None = None  # the call that was interrupted or failed
        self.mappings: list[tuple[weakref.ref[Any], int, int, list[bool]]] = []
        self.problems: list[str] = []
        self.registered: list[tuple[Any, Any, list[str] | None]] = []  # NIXL: (agent, descs, backends) that succeeded
        # held across "map, then track" and "unmap, then read /proc/self/maps": another thread's new mapping at a
        # just-freed address must not look like the old one still mapped
        self._maps_lock = threading.RLock()
        # a mapping collected by the cycle collector has its weak references called back before it is unmapped:
        # those are checked once the collection is over
        self._collecting = False
        self._collected: list[tuple[int, int]] = []

    # -- wrapping --------------------------------------------------------------------------------------------

    def __enter__(self) -> Syscalls:
        gc.callbacks.append(self._gc_phase)
        for owner, name in self._targets:
            real = getattr(owner, name)
            self._saved.append((owner, name, real))
            setattr(owner, name, self._wrap(owner, name, real))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)
        self._saved.clear()
        gc.callbacks.remove(self._gc_phase)

    def _gc_phase(self, phase: str, info: dict[str, int]) -> None:
        self._collecting = phase == "start"
        if phase == "stop" and self._collected:
            collected, self._collected = self._collected, []
            with self._maps_lock:
                for addr, length in collected:
                    self._check_unmapped(addr, length)

    def real(self, owner: object, name: str) -> Any:
        return next(r for o, n, r in self._saved if o is owner and n == name)

    def plan(self, at: int | None, when: str = "after", error: Callable[[], BaseException] = Injected) -> None:
        """Count from here; call ``at`` fails (None: only count)."""
        self._thread = threading.current_thread()
        self._at, self._when, self._error = at, when, error
        self.calls = []
        self.hit = None

    def _wrap(self, owner: object, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            mine = threading.current_thread() is self._thread
            if mine:
                self.calls.append(name)
            hit = mine and self._at is not None and len(self.calls) == self._at and self.hit is None
            if hit:
                self.hit = name
            if hit and (self._when == "before" or name in self._refuse):  # a refused call fails: the interrupt wins
                raise self._error()
            if name in self._refuse:
                code = self._refuse[name]
                raise OSError(code, f"{name}: {os.strerror(code)} (refused by the test)")
            if name in ("map_anonymous", "close_mapping"):
                with self._maps_lock:
                    was_open = name == "close_mapping" and not args[0].closed
                    result = self._call(real, hit, *args, **kwargs)
                    if name == "map_anonymous":
                        self._track(result)
                    elif was_open:
                        self._check_gone(args[0])
            else:
                result = self._call(real, hit, *args, **kwargs)
            if name == "register_memory":
                self.registered.append((owner, args[0], kwargs.get("backends")))
            if hit:
                del result  # as when Ctrl-C lands as the call returns: the caller never sees the result
                raise self._error()
            return result

        return call

    def _call(self, real: Callable[..., Any], hit: bool, *args: Any, **kwargs: Any) -> Any:
        try:
            return real(*args, **kwargs)
        except Exception:
            if hit:  # the call failed on its own: the interrupt arrives instead of the error, as with EINTR
                raise self._error() from None
            raise

    # -- mappings ------------------------------------------------------------------------------------------

    def _track(self, memory: Any) -> None:
        addr, length = self.real(_libc, "address_of")(memory), len(memory)
        unmapped = [False]  # set once the mapping is seen unmapped: its object dying later unmaps nothing

        def collected(_: object) -> None:
            if unmapped[0]:
                return
            if self._collecting:  # called back before the collector unmaps it: checked when the collection ends
                self._collected.append((addr, length))
                return
            with self._maps_lock:  # called back by mmap's dealloc, right after its munmap
                self._check_unmapped(addr, length)

        self.mappings.append((weakref.ref(memory, collected), addr, length, unmapped))

    def _check_gone(self, memory: Any) -> None:
        if memory.closed:
            for ref, addr, length, unmapped in self.mappings:
                if ref() is memory:
                    unmapped[0] = True
                    self._check_unmapped(addr, length)

    def _check_unmapped(self, addr: int, length: int) -> None:
        """A finding when the whole range is still mapped. munmap releases all of a range or none of it, and another
        thread's new mapping (a thread stack, a malloc arena, UCX's pools) may take part of a freed range between the
        munmap and this look, never exactly all of it but by a coincidence the report below would show."""
        mapped, looked = pages_mapped(addr, length)
        if mapped == looked:
            with open("/proc/self/maps") as f:  # what maps it now, for the report (rare: read only here)
                there = [line.strip() for line in f if _overlaps(line, addr, length)]
            threads = [t.name for t in threading.enumerate()]
            self.problems.append(
                f"[0x{addr:x}, +{length}) is still mapped after its owner let go: {there}; threads {threads}"
            )

    def live_mappings(self) -> list[tuple[int, int]]:
        """Mappings made (while wrapped) whose owner has neither unmapped them nor been collected."""
        return [(a, n) for ref, a, n, _ in self.mappings if (m := ref()) is not None and not m.closed]


# --- what the process holds --------------------------------------------------------------------------------------


_PAGE = os.sysconf("SC_PAGE_SIZE")
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def pages_mapped(addr: int, length: int) -> tuple[int, int]:
    """How many of the pages looked at in ``[addr, addr + length)`` the kernel maps, and how many were looked at
    (mincore(2) fails with ENOMEM on a page that is not mapped): every page of a small range, 64 spread over a large
    one, first and last always. Asking page by page costs microseconds, where reading /proc/self/maps of a process
    with CUDA and UCX loaded costs milliseconds."""
    pages = -(-length // _PAGE)
    picks = range(pages) if pages <= 64 else sorted({0, pages - 1, *range(0, pages, pages // 62)})
    vec = ctypes.c_ubyte()
    return sum(_LIBC.mincore(addr + i * _PAGE, _PAGE, ctypes.byref(vec)) == 0 for i in picks), len(picks)


def any_page_mapped(addr: int, length: int) -> bool:
    return pages_mapped(addr, length)[0] > 0


def is_mapped(addr: int) -> bool:
    """Whether ``addr`` lies in any mapping of this process (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return any(_overlaps(line, addr, 1) for line in f)


def _overlaps(maps_line: str, addr: int, length: int) -> bool:
    lo, hi = (int(x, 16) for x in maps_line.split(" ", 1)[0].split("-"))
    return lo < addr + length and addr < hi


def open_fds() -> dict[int, str]:
    """Descriptor -> what it points at (/proc/self/fd)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with suppress(OSError):  # the one listdir itself used, closed by now
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


class Holdings:
    """What the process holds before an input, compared with what it holds after: no new descriptor (none may point
    under ``directory``), and no new file in the ``empty`` directories (default: ``directory``)."""

    def __init__(self, directory: str, empty: Sequence[str] | None = None) -> None:
        self.directory = directory
        self.empty = {d: set(os.listdir(d)) for d in ([directory] if empty is None else empty)}
        self.fds = open_fds()

    def leaks(self, syscalls: Syscalls | None = None, keep: Sequence[int] = ()) -> list[str]:
        """Descriptors, files and mappings left behind since construction, after a garbage collection (which then
        freezes what survived, so that the next input's collection only walks that input's objects: a full
        collection of a test process costs tens of milliseconds). ``keep``: descriptors that may stay open."""
        gc.collect()
        gc.freeze()
        found = []
        for fd, target in open_fds().items():
            if fd in keep:
                continue
            if fd not in self.fds or self.fds[fd] != target:
                found.append(f"descriptor {fd} -> {target} was not open before")
        for directory, before in self.empty.items():
            names = sorted(set(os.listdir(directory)) - before)
            if names:
                found.append(f"files left in {directory}: {names}")
        if syscalls is not None:
            found += [f"mapping [0x{a:x}, +{n}) not released" for a, n in syscalls.live_mappings()]
            found += syscalls.problems
        return found


def nixl_still_holds(syscalls: Syscalls) -> list[str]:
    """What NIXL agents still hold of the registrations seen: each is deregistered here, and must not be found."""
    held = []
    for agent, descs, backends in syscalls.registered:
        deregister = getattr(type(agent), "deregister_memory", None) or agent.deregister_memory
        try:
            if backends is None:
                deregister(agent, descs)
            else:
                deregister(agent, descs, backends=backends)
        except Exception as exc:
            if "NIXL_ERR_NOT_FOUND" not in str(exc) and type(exc).__name__ != "nixlNotFoundError":
                held.append(f"NIXL deregistration check failed: {exc}")
        else:
            held.append(f"NIXL still held {descs!r} ({backends})")
    syscalls.registered.clear()
    return held


@contextmanager
def frozen_heap() -> Iterator[None]:
    """For a fuzz module: the objects that exist now are left out of every collection until the end, and so are those
    each input leaves alive (:meth:`Holdings.leaks` freezes them), which keeps a collection per input cheap."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """No input may hang: past ``seconds`` every thread's stack is printed and the process exits (a finding that no
    ``except`` can swallow)."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def os_error(code: int, call: str = "injected") -> Callable[[], OSError]:
    return lambda: OSError(code, f"{call}: {os.strerror(code)} (injected)")


__all__ = [
    "LIBC_CALLS",
    "OS_CALLS",
    "Holdings",
    "Injected",
    "Syscalls",
    "frozen_heap",
    "is_mapped",
    "nixl_still_holds",
    "open_fds",
    "os_error",
    "watchdog",
]
