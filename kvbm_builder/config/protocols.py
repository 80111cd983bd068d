"""What the configuration expects of runtime objects it cannot describe as data.

Storage kinds and the duck-typed protocols of storages, allocators, offload filters and event
managers live here, so that config stays pure: the real implementations (``kvbm_builder.storage``)
depend on this module, never the other way round.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

from ..errors import ConfigError, Problem, show
from .names import name_key


class StorageKind(enum.Enum):
    """Where a storage's bytes live; a tier slot accepts only some kinds."""

    DEVICE = "device"  # G1: GPU memory
    PINNED = "pinned"  # G2: page-locked host memory
    SYSTEM = "system"  # G2 without CUDA: ordinary page-aligned host memory
    DISK = "disk"  # G3: a file

    @classmethod
    def parse(cls, value: object) -> StorageKind:
        """A StorageKind, or its name as text in any case, spaces around ignored: ``"Pinned"``, ``" disk "``.

        The one reading of an allocator's ``kind`` (files, the environment, the command line). Anything else
        raises a ConfigError (path relative to the value) listing the accepted kinds.
        """
        if isinstance(value, StorageKind):
            return value
        found = _KIND_NAMES.get(name_key(value, trim=True) or "")
        if found is not None:
            return found
        accepted = ", ".join(kind.value for kind in cls)
        raise ConfigError([Problem((), f"must be a storage kind ({accepted}), got {show(value)}")])

    @property
    def nixl_mem_type(self) -> str:
        return {"device": "VRAM", "pinned": "DRAM", "system": "DRAM", "disk": "FILE"}[self.value]

    @property
    def tier(self) -> Tier:
        """The tier a storage of this kind serves: device -> G1, pinned and system -> G2, disk -> G3."""
        return _TIER_OF_KIND[self]


class Tier(enum.Enum):
    """A cache level and the slot of :class:`KvBlockManagerConfig` that describes it."""

    G1 = "device_layout"
    G2 = "host_layout"
    G3 = "disk_layout"

    @property
    def slot(self) -> str:
        return self.value

    @property
    def accepts(self) -> frozenset[StorageKind]:
        return _ACCEPTS[self]

    @property
    def words(self) -> str:
        return {"G1": "device tier (G1)", "G2": "host tier (G2)", "G3": "disk tier (G3)"}[self.name]

    @property
    def default_kind(self) -> StorageKind:
        """The memory a tier gets when nothing says otherwise (a document's allocator table without ``kind``,
        a tier made by a ``DYN_KVBM_*`` size): device, pinned, disk."""
        return _DEFAULT_KIND[self]


_ACCEPTS = {
    Tier.G1: frozenset({StorageKind.DEVICE}),
    Tier.G2: frozenset({StorageKind.PINNED, StorageKind.SYSTEM}),
    Tier.G3: frozenset({StorageKind.DISK}),
}
_DEFAULT_KIND = {Tier.G1: StorageKind.DEVICE, Tier.G2: StorageKind.PINNED, Tier.G3: StorageKind.DISK}
_KIND_NAMES = {kind.value: kind for kind in StorageKind}
_TIER_OF_KIND = {kind: tier for tier, kinds in _ACCEPTS.items() for kind in kinds}


@runtime_checkable
class Storage(Protocol):
    """One allocation a layout lives in. ``addr`` is a pointer, or for disk the file offset base (0)."""

    @property
    def kind(self) -> StorageKind: ...

    @property
    def addr(self) -> int: ...

    @property
    def size(self) -> int: ...


@runtime_checkable
class StorageAllocator(Protocol):
    """Makes storages of one kind; ``allocate`` returns an owned storage of at least ``size`` bytes."""

    @property
    def storage_kind(self) -> StorageKind: ...

    def allocate(self, size: int) -> Storage: ...


@runtime_checkable
class OffloadFilter(Protocol):
    """Decides which blocks of a tier are offloaded to the next lower tier."""

    def should_offload(self, sequence_hash: int) -> bool: ...


@runtime_checkable
class EventManager(Protocol):
    """Receives store events when blocks are registered and remove events when they are released."""

    def on_store(self, event: object) -> None: ...

    def on_remove(self, event: object) -> None: ...
