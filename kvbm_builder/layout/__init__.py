"""Layout math (pure integers): where each (block, layer, outer) region of a tier lives."""

from ._layout import Layout, MemoryRegion, StorageTooSmallError
from ._math import LayoutIndexError, LayoutSpec, align_up

__all__ = ["Layout", "LayoutIndexError", "LayoutSpec", "MemoryRegion", "StorageTooSmallError", "align_up"]
