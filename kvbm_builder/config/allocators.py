"""The built-in allocators, as plain data: *how* a tier's memory is made, not the memory itself.

Each is a frozen attrs class that a config file can describe (``{"device_id": 0}``). Config is data: turning a
description into real memory is the storage layer's job (:func:`kvbm_builder.storage.allocate`), so importing the
configuration never imports the storage modules, cupy or nixl. A caller's own allocator (anything with
``storage_kind`` and ``allocate(size)``) is used through its own ``allocate()``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, ClassVar, TypeAlias

import attrs

from ..errors import ConfigError, Problem, show
from . import env
from .env import EnvVar
from .fields import Rule, Validated, field, integer, optional, spelled, true_or_false
from .names import name_key
from .protocols import StorageKind

#: ``progress(done_bytes, total_bytes)``, called from the allocating thread during long bring-ups.
ProgressCallback = Callable[[int, int], None]

_DEVICE_ID = integer(min=0, max=2**31 - 1)


@attrs.frozen(kw_only=True)
class DeviceAllocator(Validated):
    """G1: exact cupy allocations on GPU ``device_id`` (never cupy's caching pool)."""

    _kvbm_root: ClassVar[str] = "allocator"
    storage_kind: ClassVar[StorageKind] = StorageKind.DEVICE

    device_id: int = field(default=0, rule=_DEVICE_ID, doc="The GPU ordinal.")


def _words(value: object) -> str:
    return name_key(value, drop="_-") or ""


class PinningMode(enum.Enum):
    """How G2 memory is pinned. ``register``: anonymous mmap, pages populated by several threads, then
    ``cudaHostRegister`` (fast). ``host_alloc``: ``cudaHostAlloc``, as upstream (slow for large tiers)."""

    register = "register"
    host_alloc = "host_alloc"

    @classmethod
    def parse(cls, value: object) -> PinningMode:
        """``"register"`` or ``"host_alloc"`` (case, ``_`` and ``-`` ignored), or a PinningMode."""
        if isinstance(value, PinningMode):
            return value
        for mode in cls:
            if _words(value) == _words(mode.value):
                return mode
        raise ConfigError([Problem((), f"must be 'register' or 'host_alloc', got {show(value)}")])


def _progress(value: object) -> str | None:
    return None if callable(value) else f"must be callable as progress(done, total), got {show(value)}"


@attrs.frozen(kw_only=True)
class PinnedAllocator(Validated):
    """G2: page-locked host memory that GPU ``device_id`` copies to and from at full speed."""

    _kvbm_root: ClassVar[str] = "allocator"
    storage_kind: ClassVar[StorageKind] = StorageKind.PINNED

    device_id: int = field(default=0, rule=_DEVICE_ID, doc="The GPU that copies to and from this memory.")
    mode: PinningMode = field(
        default=PinningMode.register,
        **spelled(PinningMode.parse, PinningMode, names=(("register", "host_alloc"), "words")),
        doc="register: mmap, parallel first touch, then cudaHostRegister (fast); host_alloc: cudaHostAlloc.",
    )
    huge_pages: bool = field(
        default=False,
        rule=true_or_false,
        env=EnvVar(env.DYN_KVBM_USE_HUGE_PAGES, "flag"),
        doc="Back the tier with huge pages (DYN_KVBM_USE_HUGE_PAGES).",
    )
    numa: bool = field(
        default=False,
        rule=true_or_false,
        env=EnvVar(env.DYN_KVBM_ENABLE_NUMA, "flag"),
        doc="Place memory on the GPU's NUMA node (DYN_KVBM_ENABLE_NUMA).",
    )
    threads: int | None = field(
        default=None,
        rule=optional(integer(min=1, max=1024)),
        doc="Threads that first-touch the pages (mode register; default: the usable CPUs, at most 16).",
    )
    progress: ProgressCallback | None = field(
        default=None,
        eq=False,
        repr=False,
        document=False,
        rule=optional(Rule(_progress)),
        doc="progress(done_bytes, total_bytes), called while a large tier comes up.",
    )

    @classmethod
    def _relations(cls, get: Callable[[str], Any], bad: frozenset[str]) -> list[Problem]:
        huge, numa = get("huge_pages") is True, get("numa") is True
        if huge and numa:
            return [
                Problem(
                    ("numa",),
                    "huge_pages and numa cannot both be on (upstream: DYN_KVBM_USE_HUGE_PAGES with "
                    "DYN_KVBM_ENABLE_NUMA is an error); turn one off",
                )
            ]
        if huge and get("mode") is PinningMode.host_alloc:
            return [Problem(("huge_pages",), "huge pages need mode 'register' (mmap + cudaHostRegister)")]
        return []


@attrs.frozen(kw_only=True)
class SystemAllocator(Validated):
    """G2 without CUDA: ordinary page-aligned host memory (no pinning, no GPU needed)."""

    _kvbm_root: ClassVar[str] = "allocator"
    storage_kind: ClassVar[StorageKind] = StorageKind.SYSTEM


def _directory(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return f"must be a directory path, got {show(value)}"
    if "\0" in value:
        return f"must not contain a NUL byte (no file system path can), got {show(value)}"
    return None


@attrs.frozen(kw_only=True)
class DiskAllocator(Validated):
    """G3: one file per storage in ``directory``, mode 0600, removed on release."""

    _kvbm_root: ClassVar[str] = "allocator"
    storage_kind: ClassVar[StorageKind] = StorageKind.DISK

    directory: str = field(
        default="/tmp/",
        rule=Rule(_directory, {"type": "string", "minLength": 1}, plain=True),
        env=EnvVar(env.DYN_KVBM_DISK_CACHE_DIR, "text"),
        doc="Where the cache file is created (DYN_KVBM_DISK_CACHE_DIR; upstream's default /tmp/).",
    )
    o_direct: bool = field(
        default=True,
        rule=true_or_false,
        env=EnvVar(env.DYN_KVBM_DISK_DISABLE_O_DIRECT, "set", when_set=False),
        doc="Open the file with O_DIRECT (DYN_KVBM_DISK_DISABLE_O_DIRECT, when set, turns it off).",
    )
    zerofill_fallback: bool = field(
        default=False,
        rule=true_or_false,
        env=EnvVar(env.DYN_KVBM_DISK_ZEROFILL_FALLBACK, "set", when_set=True),
        doc="Zero-fill when the file system refuses fallocate (DYN_KVBM_DISK_ZEROFILL_FALLBACK).",
    )


BuiltinAllocator: TypeAlias = "DeviceAllocator | PinnedAllocator | SystemAllocator | DiskAllocator"
#: The allocators a document can describe, in the order of their tiers.
BUILTIN_ALLOCATORS: tuple[type, ...] = (DeviceAllocator, PinnedAllocator, SystemAllocator, DiskAllocator)
#: The built-in allocator of each storage kind.
ALLOCATOR_OF_KIND: dict[StorageKind, type] = {cls.storage_kind: cls for cls in BUILTIN_ALLOCATORS}  # type: ignore[attr-defined]
