"""Layout math (pure integers): where each (block, layer, outer) region of a tier lives."""

from ..config.sizes import align_up
from ..errors import LayoutIndexError, StorageTooSmallError
from ._layout import Layout, MemoryRegion
from ._math import LayoutSpec

__all__ = ["Layout", "LayoutIndexError", "LayoutSpec", "MemoryRegion", "StorageTooSmallError", "align_up"]
