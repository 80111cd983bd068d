"""The built-in allocators, as plain data: *how* a tier's memory is made, not the memory itself.

Each is a frozen attrs class that a config file can describe (``{"device_id": 0}``). Config is data: turning a
description into real memory is the storage layer's job (:func:`kvbm_builder.storage.allocate`), so importing the
configuration never imports the storage modules, cupy or nixl. A caller's own allocator (anything with
``storage_kind`` and ``allocate(size)``) is used through its own ``allocate()``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import ClassVar, TypeAlias

import attrs

from ..errors import Problem
from ._rules import Validated, instance, integer, optional, rule, show
from .protocols import StorageKind

#: ``progress(done_bytes, total_bytes)``, called from the allocating thread during long bring-ups.
ProgressCallback = Callable[[int, int], None]

#: The rule of every true/false field (the pinned tier's PinTuning shares it).
true_or_false = rule(instance(bool, what="true or false"))
_progress = rule(optional(lambda v: None if callable(v) else "must be callable as progress(done, total)"))


@attrs.frozen(kw_only=True)
class DeviceAllocator(Validated):
    """G1: exact cupy allocations on GPU ``device_id`` (never cupy's caching pool)."""

    _kvbm_root: ClassVar[str] = "allocator"
    storage_kind: ClassVar[StorageKind] = StorageKind.DEVICE

    device_id: int = attrs.field(default=0, metadata=rule(integer(min=0)))


class PinningMode(enum.Enum):
    """How G2 memory is pinned. ``register``: anonymous mmap, pages populated by several threads, then
    ``cudaHostRegister`` (fast). ``host_alloc``: ``cudaHostAlloc``, as upstream (slow for large tiers)."""

    register = "register"
    host_alloc = "host_alloc"


@attrs.frozen(kw_only=True)
class PinnedAllocator(Validated):
    """G2: page-locked host memory that GPU ``device_id`` copies to and from at full speed."""

    _kvbm_root: ClassVar[str] = "allocator"
    storage_kind: ClassVar[StorageKind] = StorageKind.PINNED

    device_id: int = attrs.field(default=0, metadata=rule(integer(min=0)))
    mode: PinningMode = attrs.field(
        default=PinningMode.register, metadata=rule(instance(PinningMode, what="a PinningMode"))
    )
    huge_pages: bool = attrs.field(default=False, metadata=true_or_false)
    numa: bool = attrs.field(default=False, metadata=true_or_false)
    threads: int | None = attrs.field(default=None, metadata=rule(optional(integer(min=1, max=1024))))
    progress: ProgressCallback | None = attrs.field(default=None, eq=False, repr=False, metadata=_progress)

    @classmethod
    def _cross_check(cls, good: Mapping[str, object], values: Mapping[str, object]) -> list[Problem]:
        if good.get("huge_pages") is True and good.get("numa") is True:
            return [
                Problem(
                    ("numa",),
                    "huge_pages and numa cannot both be on (upstream: DYN_KVBM_USE_HUGE_PAGES with "
                    "DYN_KVBM_ENABLE_NUMA is an error); turn one off",
                )
            ]
        if good.get("mode") is PinningMode.host_alloc and good.get("huge_pages") is True:
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
    """G3: one file per storage in ``directory`` (``DYN_KVBM_DISK_CACHE_DIR``), mode 0600, removed on release.

    ``o_direct=False`` is ``DYN_KVBM_DISK_DISABLE_O_DIRECT``; ``zerofill_fallback=True`` is
    ``DYN_KVBM_DISK_ZEROFILL_FALLBACK`` (zero-fill when the file system refuses ``fallocate``).
    """

    _kvbm_root: ClassVar[str] = "allocator"
    storage_kind: ClassVar[StorageKind] = StorageKind.DISK

    directory: str = attrs.field(default="/tmp/", metadata=rule(_directory))
    o_direct: bool = attrs.field(default=True, metadata=true_or_false)
    zerofill_fallback: bool = attrs.field(default=False, metadata=true_or_false)


BuiltinAllocator: TypeAlias = "DeviceAllocator | PinnedAllocator | SystemAllocator | DiskAllocator"
#: The allocators a document can describe, in the order of their tiers.
BUILTIN_ALLOCATORS: tuple[type, ...] = (DeviceAllocator, PinnedAllocator, SystemAllocator, DiskAllocator)
