"""From an allocator to real memory: the one place that turns a built-in allocator description into storage.

The configuration describes memory (``DeviceAllocator(device_id=0)`` is data); this module makes it. A caller's own
allocator is used through its own ``allocate(size)``.
"""

from __future__ import annotations

from ..config.allocators import BuiltinAllocator, DeviceAllocator, DiskAllocator, PinnedAllocator, SystemAllocator
from ..config.protocols import Storage, StorageAllocator
from .device import allocate_device
from .disk import allocate_disk
from .pinned import allocate_pinned
from .system import allocate_system


def allocate(allocator: BuiltinAllocator | StorageAllocator, size: int) -> Storage:
    """An owned storage of at least ``size`` bytes, made as ``allocator`` says.

    The built-in allocators give a :class:`DeviceStorage`, :class:`PinnedStorage`, :class:`SystemStorage` or
    :class:`DiskStorage`; any other allocator's ``allocate(size)`` is called.
    """
    if isinstance(allocator, DeviceAllocator):
        return allocate_device(size, allocator.device_id)
    if isinstance(allocator, PinnedAllocator):
        return allocate_pinned(size, allocator)
    if isinstance(allocator, SystemAllocator):
        return allocate_system(size)
    if isinstance(allocator, DiskAllocator):
        return allocate_disk(size, allocator)
    made: Storage = allocator.allocate(size)
    return made
