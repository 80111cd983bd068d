"""``KvBlockManagerConfig``: the whole cache hierarchy: runtime, model, up to three tiers, extras."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import attrs

from ..errors import Problem, show
from ._builder import Builder
from .consolidator import EventSource, KvEventConsolidatorConfig, consolidator_from_setter, engine_source_problem
from .env import CPU_CACHE, DISK_CACHE
from .fields import Rule, Validated, duck, field, instance, optional
from .layout import KvManagerLayoutConfig, span_bytes
from .model import KvManagerModelConfig
from .protocols import EventManager, StorageKind, Tier
from .runtime import KvManagerRuntimeConfig
from .sizes import MAX_BYTES

if TYPE_CHECKING:
    from ..metrics import KvbmMetrics, NullKvbmMetrics

_B = TypeVar("_B", bound="KvBlockManagerConfigBuilder")

_layout = optional(instance(KvManagerLayoutConfig, what="a KvManagerLayoutConfig (build it first)"))


def _kvbm_metrics_check(value: object) -> str | None:
    if value is None:
        return None
    # A KvbmMetrics can only exist once its module is imported; importing it here would make config depend on metrics
    metrics = sys.modules.get("kvbm_builder.metrics.kvbm")
    if metrics is not None and isinstance(value, (metrics.KvbmMetrics, metrics.NullKvbmMetrics)):
        return None
    return (
        "must be a kvbm_builder.metrics.KvbmMetrics (or NullKvbmMetrics to count nothing), or None for the manager "
        f"to make its own on runtime.metrics_registry; got {show(value)}"
    )


@attrs.frozen(kw_only=True)
class KvBlockManagerConfig(Validated):
    """Everything a KV block manager needs. Tiers are optional; each tier's storage kind must suit its
    slot (device memory for ``device_layout``, pinned or system memory for ``host_layout``, a file for
    ``disk_layout``)."""

    _kvbm_root: ClassVar[str] = ""

    runtime: KvManagerRuntimeConfig = field(
        rule=instance(KvManagerRuntimeConfig, what="a KvManagerRuntimeConfig (build it first)"),
        doc="Who the manager is, and whether it uses NIXL.",
    )
    model: KvManagerModelConfig = field(
        rule=instance(KvManagerModelConfig, what="a KvManagerModelConfig (build it first)"),
        doc="The shape of one KV block: [num_layers, outer_dim, page_size, inner_dim] elements.",
    )
    device_layout: KvManagerLayoutConfig[Any] | None = field(
        default=None, rule=_layout, doc="The device tier (G1, GPU memory)."
    )
    host_layout: KvManagerLayoutConfig[Any] | None = field(
        default=None, rule=_layout, env=CPU_CACHE, doc="The host tier (G2, pinned or system memory)."
    )
    disk_layout: KvManagerLayoutConfig[Any] | None = field(
        default=None, rule=_layout, env=DISK_CACHE, doc="The disk tier (G3, a file)."
    )
    event_manager: EventManager | None = field(
        default=None,
        eq=False,
        document=False,
        rule=optional(duck(("on_store", "on_remove"), "an event manager")),
        doc="Receives store and remove events of blocks.",
    )
    block_reset_channel: Any = field(
        default=None, eq=False, document=False, doc="Upstream reserves it: a channel to reset a cache level."
    )
    kvbm_metrics: KvbmMetrics | NullKvbmMetrics | None = field(
        default=None,
        eq=False,
        document=False,
        rule=Rule(_kvbm_metrics_check),
        doc="Counts what the manager moves, skips and finds (kvbm_builder.metrics.KvbmMetrics; NullKvbmMetrics counts "
        "nothing). None: the manager makes its own on runtime.metrics_registry.",
    )
    consolidator_config: KvEventConsolidatorConfig | None = field(
        default=None,
        rule=optional(instance(KvEventConsolidatorConfig, what="a KvEventConsolidatorConfig")),
        doc="Deduplicates the KV events of the engine (G1) and of KVBM (G2, G3).",
    )

    @classmethod
    def _relations(cls, get: Callable[[str], Any], bad: frozenset[str]) -> list[Problem]:
        problems: list[Problem] = []
        model = None if "model" in bad else get("model")
        for tier, slot, accepts in _SLOTS:
            layout = None if slot in bad else get(slot)
            if layout is not None:
                found = tier_problems(tier, layout, model, accepts)
                if found:
                    problems.extend(p.under(slot) for p in found)
        consolidator = None if "consolidator_config" in bad else get("consolidator_config")
        if consolidator is not None:
            refused = engine_source_problem(consolidator.engine_source)
            if refused is not None:
                problems.append(refused.under("consolidator_config"))
        return problems

    def tiers(self) -> list[tuple[Tier, KvManagerLayoutConfig[Any]]]:
        """The configured tiers, fastest first."""
        return [(t, lay) for t in Tier if (lay := getattr(self, t.slot)) is not None]

    @staticmethod
    def builder() -> KvBlockManagerConfigBuilder:
        return KvBlockManagerConfigBuilder()


_SLOTS = tuple((tier, tier.slot, tuple(tier.accepts)) for tier in Tier)


def tier_problems(
    tier: Tier,
    layout: KvManagerLayoutConfig[Any],
    model: KvManagerModelConfig | None = None,
    accepts: tuple[StorageKind, ...] = (),
) -> list[Problem]:
    """What makes ``layout`` unfit for ``tier``'s slot (paths relative to the layout). Given the ``model``, also a
    tier too big for any memory or file: more than 2**63 - 1 bytes, alignment padding included (:func:`span_bytes`,
    the layout's own rule: what validates, the layout and the manager can lay out)."""
    problems: list[Problem] = []
    if model is not None and span_bytes(model, layout.num_blocks, layout.layout_type, layout.alignment) > MAX_BYTES:
        problems.append(span_problem(model, layout))
    accepts = accepts or tuple(tier.accepts)  # a tuple: membership by identity skips Enum's Python-level __hash__
    allocator = layout.allocator
    if allocator is not None:
        kind = allocator.storage_kind
        if kind not in accepts:
            accepted = " or ".join(sorted(k.value for k in accepts))
            problems.append(
                Problem(
                    ("allocator",),
                    f"a {kind.value} allocator cannot back the {tier.words}; it needs {accepted} memory",
                )
            )
    for i, storage in enumerate(layout.storage or ()):
        if storage.kind not in accepts:
            accepted = " or ".join(sorted(k.value for k in accepts))
            problems.append(
                Problem(
                    ("storage", i),
                    f"{storage.kind.value} storage cannot back the {tier.words}; it needs {accepted} memory",
                )
            )
    if tier is Tier.G3 and layout.offload_filter is not None:
        problems.append(Problem(("offload_filter",), "the disk tier is the last tier: there is nothing to offload to"))
    return problems


def span_problem(model: KvManagerModelConfig, layout: KvManagerLayoutConfig[Any]) -> Problem:
    """The problem of a tier past :data:`MAX_BYTES`, reported at ``num_blocks`` with the most blocks that fit."""
    num_blocks, layout_type, alignment = layout.num_blocks, layout.layout_type, layout.alignment
    per_block = model.bytes_per_block
    total = span_bytes(model, num_blocks, layout_type, alignment)
    low, high = 0, num_blocks  # the most blocks that fit: span_bytes grows with the count
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (
            (middle, high) if span_bytes(model, middle, layout_type, alignment) <= MAX_BYTES else (low, middle - 1)
        )
    padding = "" if total == num_blocks * per_block else " with their alignment padding"
    return Problem(
        ("num_blocks",),
        f"{num_blocks} blocks of {per_block} bytes need {total} bytes{padding}, more than the "
        f"{MAX_BYTES} bytes (2**63 - 1) memory and files can span; lower num_blocks to at most {low}, "
        "or make the blocks smaller (page_size, inner_dim, num_layers)",
    )


class KvBlockManagerConfigBuilder(Builder[KvBlockManagerConfig]):
    """Setters return the builder's own type, so ``KvBlockManager.builder()`` chains to a manager."""

    _target = KvBlockManagerConfig

    def runtime(self: _B, value: KvManagerRuntimeConfig) -> _B:
        return self._set("runtime", value)

    def model(self: _B, value: KvManagerModelConfig) -> _B:
        return self._set("model", value)

    def device_layout(self: _B, value: KvManagerLayoutConfig[Any]) -> _B:
        return self._set("device_layout", value)

    def host_layout(self: _B, value: KvManagerLayoutConfig[Any]) -> _B:
        return self._set("host_layout", value)

    def disk_layout(self: _B, value: KvManagerLayoutConfig[Any]) -> _B:
        return self._set("disk_layout", value)

    def event_manager(self: _B, value: EventManager | None) -> _B:
        return self._set("event_manager", value)

    def block_reset_channel(self: _B, value: Any) -> _B:
        return self._set("block_reset_channel", value)

    def kvbm_metrics(self: _B, value: KvbmMetrics | NullKvbmMetrics | None) -> _B:
        return self._set("kvbm_metrics", value)

    def consolidator_config(
        self: _B,
        engine_endpoint: str,
        output_endpoint: str | None,
        engine_source: EventSource | str,
    ) -> _B:
        """Custom setter (upstream's): Vllm and Trtllm need ``output_endpoint``; Kvbm is never valid here.
        Where upstream panics, this records a configuration error reported by ``build()``."""
        made = consolidator_from_setter(engine_endpoint, output_endpoint, engine_source)
        if isinstance(made, str):
            return self._reject("consolidator_config", made)
        return self._set("consolidator_config", made)
