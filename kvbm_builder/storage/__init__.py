"""Real memory and files for the three tiers: device (G1), pinned or system host (G2), disk (G3).

Each ``allocate_*`` returns an owned storage that satisfies :class:`kvbm_builder.config.protocols.Storage`
(``kind``, ``addr``, ``size``) plus ``device_id`` (NIXL's devId), ``close()`` (idempotent), ``closed`` and
the context-manager protocol. Importing this package imports neither cupy nor nixl.
"""

from ..errors import DiskReservationWarning, StorageBufferError, StorageClosedError
from ._base import OwnedStorage
from ._cuda import cuda_available, cuda_unavailable_reason
from .device import DeviceStorage, allocate_device
from .disk import DiskStorage, allocate_disk
from .dispatch import allocate
from .pinned import PinnedStorage, PinTuning, allocate_pinned
from .system import SystemStorage, allocate_system

__all__ = [
    "DeviceStorage",
    "DiskReservationWarning",
    "DiskStorage",
    "OwnedStorage",
    "PinTuning",
    "PinnedStorage",
    "StorageBufferError",
    "StorageClosedError",
    "SystemStorage",
    "allocate",
    "allocate_device",
    "allocate_disk",
    "allocate_pinned",
    "allocate_system",
    "cuda_available",
    "cuda_unavailable_reason",
]
