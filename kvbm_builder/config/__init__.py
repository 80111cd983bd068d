"""Pure configuration: frozen attrs classes and their owned-pattern builders. No I/O, no GPU."""

from .allocators import DeviceAllocator, DiskAllocator, PinnedAllocator, PinningMode, SystemAllocator
from .consolidator import (
    ConsolidatorMode,
    EventSource,
    KvEventConsolidatorConfig,
    KvEventConsolidatorConfigBuilder,
)
from .env import should_bypass_cpu_cache
from .layout import (
    BlockParallelismStrategy,
    FullyContiguous,
    KvManagerLayoutConfig,
    KvManagerLayoutConfigBuilder,
    LayerSeparate,
    LayoutType,
)
from .manager import KvBlockManagerConfig, KvBlockManagerConfigBuilder
from .model import KvManagerModelConfig, KvManagerModelConfigBuilder
from .protocols import EventManager, OffloadFilter, Storage, StorageAllocator, StorageKind, Tier
from .runtime import (
    CancellationToken,
    KvManagerRuntimeConfig,
    KvManagerRuntimeConfigBuilder,
    NixlMode,
    NixlOptions,
)
from .settings import KvbmSettings
from .sizes import GB, GiB, parse_size

__all__ = [
    "GB",
    "BlockParallelismStrategy",
    "CancellationToken",
    "ConsolidatorMode",
    "DeviceAllocator",
    "DiskAllocator",
    "EventManager",
    "EventSource",
    "FullyContiguous",
    "GiB",
    "KvBlockManagerConfig",
    "KvBlockManagerConfigBuilder",
    "KvEventConsolidatorConfig",
    "KvEventConsolidatorConfigBuilder",
    "KvManagerLayoutConfig",
    "KvManagerLayoutConfigBuilder",
    "KvManagerModelConfig",
    "KvManagerModelConfigBuilder",
    "KvManagerRuntimeConfig",
    "KvManagerRuntimeConfigBuilder",
    "KvbmSettings",
    "LayerSeparate",
    "LayoutType",
    "NixlMode",
    "NixlOptions",
    "OffloadFilter",
    "PinnedAllocator",
    "PinningMode",
    "Storage",
    "StorageAllocator",
    "StorageKind",
    "SystemAllocator",
    "Tier",
    "parse_size",
    "should_bypass_cpu_cache",
]
