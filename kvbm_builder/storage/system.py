"""G2 without CUDA: ordinary host memory from an anonymous mmap (page aligned), unmapped on close (or, while numpy
views of it live, when the last of them goes)."""

from __future__ import annotations

from typing import ClassVar

from ..config.protocols import StorageKind
from . import _host
from ._base import check_size
from ._host import HostStorage


class SystemStorage(HostStorage):
    """Ordinary (pageable) host memory: the host tier on machines without CUDA."""

    kind: ClassVar[StorageKind] = StorageKind.SYSTEM

    def _release(self) -> None:
        assert self._mapping is not None
        self._mapping.unmap()


def allocate_system(size: int) -> SystemStorage:
    """``size`` bytes of page-aligned host memory, zero-filled by the kernel on first touch."""
    check_size(size, StorageKind.SYSTEM)
    mapping = _host.map_host(size, StorageKind.SYSTEM.tier.words)
    try:
        return SystemStorage(mapping, mapping.addr, size)
    except BaseException:  # an interrupt: the storage (if made) was dropped, so the mapping is still ours
        mapping.unmap()
        raise
