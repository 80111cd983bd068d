"""kvbm_builder: describe, validate, plan and allocate a tiered KV cache (GPU, pinned host, disk).

The configuration (``KvBlockManagerConfig`` and friends) is imported eagerly and is pure Python.
Everything that touches memory, CUDA or NIXL is imported on first use.
"""

from typing import TYPE_CHECKING

from .config import *  # noqa: F403
from .config import __all__ as _config_all
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
    UninitializedFieldError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:  # what __getattr__ below imports on first use, for type checkers and IDEs
    from .layout import Layout as Layout
    from .layout import LayoutSpec as LayoutSpec
    from .layout import MemoryRegion as MemoryRegion
    from .manager import KvBlockManager as KvBlockManager
    from .manager import KvBlockManagerBuilder as KvBlockManagerBuilder
    from .manager import TierStorage as TierStorage

# Imported on first use, so that `import kvbm_builder` stays fast and never imports cupy or nixl.
_LAZY = {
    "load": "kvbm_builder.loading",
    "load_file": "kvbm_builder.loading",
    "dump": "kvbm_builder.loading",
    "from_env": "kvbm_builder.loading",
    "LayoutSpec": "kvbm_builder.layout",
    "Layout": "kvbm_builder.layout",
    "MemoryRegion": "kvbm_builder.layout",
    "KvBlockManager": "kvbm_builder.manager",
    "KvBlockManagerBuilder": "kvbm_builder.manager",
    "TierStorage": "kvbm_builder.manager",
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
    *_config_all,
    "AllocationError",
    "BuilderConsumedError",
    "ConfigError",
    "DiskStorageError",
    "GpuUnavailableError",
    "KvbmError",
    "LayoutError",
    "LoadError",
    "NixlError",
    "Problem",
    "UninitializedFieldError",
    "__version__",
    *_LAZY,
]
