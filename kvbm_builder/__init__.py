"""kvbm_builder: describe, validate, plan and allocate a tiered KV cache (GPU, pinned host, disk).

The configuration (``KvBlockManagerConfig`` and friends) is imported eagerly and is pure Python.
Everything that touches memory, CUDA or NIXL is imported on first use.
"""

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
]
