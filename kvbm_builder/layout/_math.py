"""Layout arithmetic (upstream ``layout.rs``): where each (block, layer, outer) region lives, in pure integers.

``R = page_size * inner_dim * dtype_width_bytes`` is the size of one region. Offsets are counted from the aligned
start of an allocation; :class:`~kvbm_builder.layout.Layout` adds real addresses.
"""

from __future__ import annotations

import operator
from typing import Any, ClassVar

import attrs

from ..config.fields import Validated, same_as
from ..config.layout import FullyContiguous, KvManagerLayoutConfig, LayerSeparate, LayoutType, span_bytes
from ..config.model import KvManagerModelConfig
from ..config.sizes import MAX_BYTES as MAX_BYTES
from ..config.sizes import align_up as align_up
from ..errors import ConfigError, LayoutError, LayoutIndexError, Problem, show


def _checked(axis: str, value: int, bound: int) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise LayoutError(f"{axis} index must be an integer, got {show(value)}")
    index = operator.index(value)
    if not 0 <= index < bound:
        raise LayoutIndexError(axis, index, bound)
    return index


@attrs.frozen
class LayoutSpec(Validated):
    """The shape of one tier's layout, and every size and stride derived from it (see kvbm-behaviour §2).

    Fields are checked at construction (a :class:`~kvbm_builder.errors.ConfigError` naming the field);
    build one from configuration with :meth:`from_config`.
    """

    _kvbm_root: ClassVar[str] = "layout_spec"

    # each field is the configuration's own, rule and all: described once, in config
    num_blocks: int = same_as(KvManagerLayoutConfig, "num_blocks")
    num_layers: int = same_as(KvManagerModelConfig, "num_layers")
    outer_dim: int = same_as(KvManagerModelConfig, "outer_dim")
    page_size: int = same_as(KvManagerModelConfig, "page_size")
    inner_dim: int = same_as(KvManagerModelConfig, "inner_dim")
    dtype_width_bytes: int = same_as(KvManagerModelConfig, "dtype_width_bytes")
    layout_type: LayoutType = same_as(KvManagerLayoutConfig, "layout_type")
    alignment: int = same_as(KvManagerLayoutConfig, "alignment", default=1)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # every field's own rule first: the sizes below need good fields
        if self.total_bytes > MAX_BYTES:
            raise ConfigError(
                [
                    Problem(
                        (),
                        f"the layout needs {self.total_bytes} bytes (num_blocks * num_layers * outer_dim * page_size * "
                        f"inner_dim * dtype_width_bytes, plus alignment padding), more than the {MAX_BYTES} bytes "
                        "(2**63 - 1) memory and files can span; lower num_blocks, page_size, inner_dim or num_layers",
                    )
                ],
                self._kvbm_root,
            )

    @classmethod
    def from_config(cls, model: KvManagerModelConfig, layout: KvManagerLayoutConfig[Any]) -> LayoutSpec:
        return cls(
            num_blocks=layout.num_blocks,
            num_layers=model.num_layers,
            outer_dim=model.outer_dim,
            page_size=model.page_size,
            inner_dim=model.inner_dim,
            dtype_width_bytes=model.dtype_width_bytes,
            layout_type=layout.layout_type,
            alignment=layout.alignment,
        )

    @property
    def _outer_contiguous(self) -> bool:
        return isinstance(self.layout_type, LayerSeparate) and self.layout_type.outer_contiguous

    @property
    def region_bytes(self) -> int:
        """R: the bytes of one (block, layer, outer) region."""
        return self.page_size * self.inner_dim * self.dtype_width_bytes

    @property
    def natural_block_bytes(self) -> int:
        """The block stride before alignment: a whole block for FullyContiguous, one layer's part of it for
        block-contiguous LayerSeparate, one region for outer-contiguous LayerSeparate."""
        if isinstance(self.layout_type, FullyContiguous):
            return self.num_layers * self.outer_dim * self.region_bytes
        return self.region_bytes if self._outer_contiguous else self.outer_dim * self.region_bytes

    @property
    def block_stride(self) -> int:
        return align_up(self.natural_block_bytes, self.alignment)

    @property
    def outer_stride(self) -> int:
        return self.block_stride * self.num_blocks if self._outer_contiguous else self.region_bytes

    @property
    def layer_stride(self) -> int | None:
        """Bytes between layers of one block; None for LayerSeparate, where each layer is its own allocation."""
        if isinstance(self.layout_type, FullyContiguous):
            return self.outer_dim * self.region_bytes
        return None

    @property
    def num_allocations(self) -> int:
        return 1 if isinstance(self.layout_type, FullyContiguous) else self.num_layers

    @property
    def data_bytes(self) -> int:
        """Bytes of data in each allocation, from its aligned start."""
        if isinstance(self.layout_type, FullyContiguous):
            # upstream: the last block is not padded up to the stride
            return (self.num_blocks - 1) * self.block_stride + self.natural_block_bytes
        if self._outer_contiguous:
            return self.outer_stride * self.outer_dim
        return self.block_stride * self.num_blocks

    @property
    def allocation_bytes(self) -> int:
        """Bytes to request for each allocation: enough for the data wherever the allocator puts it."""
        return self.data_bytes + self.alignment - 1

    @property
    def total_bytes(self) -> int:
        """Bytes requested from the allocator for the whole tier (``num_allocations * allocation_bytes``): the
        configuration's own rule, :func:`~kvbm_builder.config.layout.span_bytes`."""
        return span_bytes(self, self.num_blocks, self.layout_type, self.alignment)

    @property
    def block_bytes(self) -> int:
        """Bytes one block occupies in this tier, padding between blocks included."""
        if isinstance(self.layout_type, FullyContiguous):
            return self.block_stride
        per_layer = self.block_stride * (self.outer_dim if self._outer_contiguous else 1)
        return self.num_layers * per_layer

    @property
    def alignment_overhead(self) -> int:
        """Bytes requested beyond the blocks' own data (padding between blocks and before each allocation)."""
        return self.total_bytes - self.num_blocks * self.num_layers * self.outer_dim * self.region_bytes

    def offset(self, block: int, layer: int, outer: int) -> tuple[int, int]:
        """(allocation index, byte offset from that allocation's aligned start) of a region.

        Indices are checked in upstream's order (block, layer, outer); a bad one raises :class:`LayoutIndexError`.
        """
        block = _checked("block", block, self.num_blocks)
        layer = _checked("layer", layer, self.num_layers)
        outer = _checked("outer", outer, self.outer_dim)
        within = block * self.block_stride + outer * self.outer_stride
        if isinstance(self.layout_type, FullyContiguous):
            return 0, within + layer * self.outer_dim * self.region_bytes
        return layer, within
