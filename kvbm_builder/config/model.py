"""``KvManagerModelConfig``: the shape of one KV block, from the model's attention."""

from __future__ import annotations

from typing import ClassVar

import attrs

from ..errors import ConfigError, Problem, show
from ._builder import Builder
from .fields import U64_MAX, Validated, field, integer, one_of

DTYPE_WIDTHS = (1, 2, 4, 8)


@attrs.frozen(kw_only=True)
class KvManagerModelConfig(Validated):
    """A block holds ``page_size`` tokens of every layer: ``[num_layers, outer_dim, page_size, inner_dim]``.

    Checked at construction and at ``build()`` (upstream checks only when the manager starts). The counts are
    upstream's ``usize``: at most 2**64 - 1.
    """

    _kvbm_root: ClassVar[str] = "model"

    num_layers: int = field(rule=integer(min=1, max=U64_MAX), doc="Attention layers of the model.")
    outer_dim: int = field(rule=integer(min=1, max=2), doc="2 = separate K and V; 1 = MLA or fused KV.")
    page_size: int = field(rule=integer(min=1, max=U64_MAX), doc="Tokens per block.")
    inner_dim: int = field(
        rule=integer(min=1, max=U64_MAX), doc="Elements per token per outer index per layer, e.g. kv_heads * head_dim."
    )
    dtype_width_bytes: int = field(default=2, rule=one_of(DTYPE_WIDTHS), doc="Bytes per element (2 for bf16, fp16).")

    @property
    def region_bytes(self) -> int:
        """R: the bytes of one (block, layer, outer) region = page_size * inner_dim * dtype_width_bytes."""
        return self.page_size * self.inner_dim * self.dtype_width_bytes

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block's data, without any layout alignment."""
        return self.num_layers * self.outer_dim * self.region_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.outer_dim * self.inner_dim * self.dtype_width_bytes

    def blocks_for_bytes(self, budget: int) -> int:
        """How many whole blocks fit in ``budget`` bytes (truncated, as upstream sizes tiers)."""
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ConfigError([Problem(("budget",), f"must be a byte count >= 0, got {show(budget)}")])
        return budget // self.bytes_per_block

    @staticmethod
    def builder() -> KvManagerModelConfigBuilder:
        return KvManagerModelConfigBuilder()


class KvManagerModelConfigBuilder(Builder[KvManagerModelConfig]):
    _target = KvManagerModelConfig

    def num_layers(self, value: int) -> KvManagerModelConfigBuilder:
        return self._set("num_layers", value)

    def outer_dim(self, value: int) -> KvManagerModelConfigBuilder:
        return self._set("outer_dim", value)

    def page_size(self, value: int) -> KvManagerModelConfigBuilder:
        return self._set("page_size", value)

    def inner_dim(self, value: int) -> KvManagerModelConfigBuilder:
        return self._set("inner_dim", value)

    def dtype_width_bytes(self, value: int) -> KvManagerModelConfigBuilder:
        return self._set("dtype_width_bytes", value)
