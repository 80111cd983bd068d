"""kvbm_builder: describe, validate, plan and allocate a tiered KV cache (GPU, pinned host, disk).

The main form validates and allocates in one chain::

    with KvBlockManager.builder().runtime(...).model(...).host_layout(...).build() as manager: ...

This module holds what most code needs: the configs and their builders, the manager, ``load``/``dump`` and the
errors. The rest is reached through its subpackage: ``kvbm_builder.config`` (sizes, the ``DYN_KVBM_*``
variables, protocols), ``kvbm_builder.loading`` (files, the environment, the JSON Schema), ``kvbm_builder.layout``,
``kvbm_builder.storage``, ``kvbm_builder.plan`` and ``kvbm_builder.testing``. Importing it is pure Python: whatever
touches memory, CUDA or NIXL is imported on first use.
"""

from typing import TYPE_CHECKING

from .config import (
    BlockParallelismStrategy,
    CancellationToken,
    ConsolidatorMode,
    DeviceAllocator,
    DiskAllocator,
    EventSource,
    FullyContiguous,
    KvBlockManagerConfig,
    KvBlockManagerConfigBuilder,
    KvbmSettings,
    KvEventConsolidatorConfig,
    KvEventConsolidatorConfigBuilder,
    KvManagerLayoutConfig,
    KvManagerLayoutConfigBuilder,
    KvManagerModelConfig,
    KvManagerModelConfigBuilder,
    KvManagerRuntimeConfig,
    KvManagerRuntimeConfigBuilder,
    LayerSeparate,
    LayoutType,
    NixlOptions,
    PinnedAllocator,
    PinningMode,
    StorageKind,
    SystemAllocator,
    Tier,
)
from .errors import (
    AllocationError,
    BuilderConsumedError,
    ConfigError,
    DiskStorageError,
    GpuUnavailableError,
    KvbmError,
    LayoutError,
    LoadError,
    NixlError,
    Problem,
    RuntimeObjectError,
    RuntimeObjectWarning,
    UninitializedFieldError,
    UsageError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:  # what __getattr__ below imports on first use, for type checkers and IDEs
    from .loading import dump as dump
    from .loading import from_env as from_env
    from .loading import load as load
    from .loading import load_file as load_file
    from .manager import KvBlockManager as KvBlockManager
    from .manager import KvBlockManagerBuilder as KvBlockManagerBuilder

# Imported on first use, so that `import kvbm_builder` stays fast and never imports cupy or nixl.
_LAZY = {
    "load": "kvbm_builder.loading",
    "load_file": "kvbm_builder.loading",
    "dump": "kvbm_builder.loading",
    "from_env": "kvbm_builder.loading",
    "KvBlockManager": "kvbm_builder.manager",
    "KvBlockManagerBuilder": "kvbm_builder.manager",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvbm_builder' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AllocationError",
    "BlockParallelismStrategy",
    "BuilderConsumedError",
    "CancellationToken",
    "ConfigError",
    "ConsolidatorMode",
    "DeviceAllocator",
    "DiskAllocator",
    "DiskStorageError",
    "EventSource",
    "FullyContiguous",
    "GpuUnavailableError",
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
    "KvbmError",
    "KvbmSettings",
    "LayerSeparate",
    "LayoutError",
    "LayoutType",
    "LoadError",
    "NixlError",
    "NixlOptions",
    "PinnedAllocator",
    "PinningMode",
    "Problem",
    "RuntimeObjectError",
    "RuntimeObjectWarning",
    "StorageKind",
    "SystemAllocator",
    "Tier",
    "UninitializedFieldError",
    "UsageError",
    "__version__",
    *_LAZY,
]
