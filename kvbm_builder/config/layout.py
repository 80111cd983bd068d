"""``KvManagerLayoutConfig``: how many blocks a tier holds, in what layout, backed by what memory."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import attrs

from ..errors import ConfigError, Problem, show
from ._builder import Builder
from .allocators import BUILTIN_ALLOCATORS, BuiltinAllocator
from .fields import U64_MAX, Rule, Validated, duck, field, integer, optional, power_of_two, spelled
from .names import name_key
from .protocols import OffloadFilter, Storage, StorageAllocator, StorageKind
from .sizes import align_up

S = TypeVar("S", bound=Storage)


CHOICES = ("storage", "allocator", "logical")  # upstream's exclusive choice, in declaration order


class LayoutType:
    """Base of the layout types; parse upstream's spellings with :meth:`parse`."""

    __slots__ = ()

    ACCEPTED: ClassVar[tuple[str, ...]] = (
        "fullycontiguous",
        "layerseparateoutercontiguous",
        "layerseparateblockcontiguous",
    )

    @staticmethod
    def parse(value: object) -> LayoutType:
        """``"FullyContiguous"``, ``"layer_separate_outer_contiguous"``, ``"layer-separate-block-contiguous"``,
        upstream's ``{"LayerSeparate": {"outer_contiguous": true}}``, or a LayoutType itself."""
        if isinstance(value, LayoutType):
            return value
        if isinstance(value, str):
            key = name_key(value, drop="_-")
            if key == "fullycontiguous":
                return FullyContiguous()
            if key == "layerseparateoutercontiguous":
                return LayerSeparate(outer_contiguous=True)
            if key == "layerseparateblockcontiguous":
                return LayerSeparate(outer_contiguous=False)
            raise ConfigError(
                [Problem((), f"unknown layout {show(value, typed=False)}; accepted: {', '.join(LayoutType.ACCEPTED)}")]
            )
        if isinstance(value, Mapping) and len(value) == 1:
            # upstream's serialized form: {"LayerSeparate": {"outer_contiguous": b}}, or {"FullyContiguous": null}
            ((name, body),) = value.items()
            key = name_key(name, drop="_-")
            if key == "layerseparate":
                if isinstance(body, Mapping) and len(body) == 1 and "outer_contiguous" in body:
                    flag = body["outer_contiguous"]
                    if isinstance(flag, bool):
                        return LayerSeparate(outer_contiguous=flag)
                raise ConfigError(
                    [Problem((), f"LayerSeparate needs {{'outer_contiguous': true|false}}, got {show(body)}")]
                )
            if key == "fullycontiguous" and (body is None or (isinstance(body, Mapping) and not body)):
                return FullyContiguous()
        raise ConfigError([Problem((), f"must be a layout name ({', '.join(LayoutType.ACCEPTED)}), got {show(value)}")])

    def to_upstream(self) -> str | dict[str, dict[str, bool]]:
        """Upstream's serialized form: ``"FullyContiguous"`` or ``{"LayerSeparate": {"outer_contiguous": b}}``."""
        raise NotImplementedError


@attrs.frozen
class FullyContiguous(LayoutType):
    """One allocation: ``[num_blocks, num_layers, outer_dim, page_size, inner_dim]``."""

    def to_upstream(self) -> str:
        return "FullyContiguous"

    def __str__(self) -> str:
        return "FullyContiguous"


@attrs.frozen
class LayerSeparate(LayoutType):
    """One allocation per layer: ``[outer_dim, num_blocks, ...]`` when ``outer_contiguous`` else
    ``[num_blocks, outer_dim, ...]`` (block-contiguous)."""

    outer_contiguous: bool

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.outer_contiguous, bool):
            raise ConfigError(
                [Problem(("outer_contiguous",), f"must be true or false, got {show(self.outer_contiguous)}")],
                "layout_type",
            )

    def to_upstream(self) -> dict[str, dict[str, bool]]:
        return {"LayerSeparate": {"outer_contiguous": self.outer_contiguous}}

    def __str__(self) -> str:
        return f"LayerSeparate(outer_contiguous={self.outer_contiguous})"


_FULLY_CONTIGUOUS = FullyContiguous()  # frozen, so one default serves every config
LAYOUT_NAMES = (("FullyContiguous", "LayerSeparateOuterContiguous", "LayerSeparateBlockContiguous"), "words")


class BlockParallelismStrategy(enum.Enum):
    """KV blocks are sharded across all workers under a leader."""

    LeaderWorkerSharded = "leader_worker_sharded"

    @classmethod
    def parse(cls, value: object) -> BlockParallelismStrategy:
        """``"LeaderWorkerSharded"`` (case, ``_`` and ``-`` ignored), or the strategy itself."""
        if isinstance(value, BlockParallelismStrategy):
            return value
        if name_key(value, drop="_-") == "leaderworkersharded":
            return cls.LeaderWorkerSharded
        raise ConfigError([Problem((), f"must be 'LeaderWorkerSharded' (or null), got {show(value)}")])


def _storages(value: object) -> object:
    """The builder's normalisation, for every construction: a list of storages is kept as a tuple."""
    return tuple(value) if isinstance(value, list) else value


def _storages_check(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return f"must be a list of storages (or None), got {show(value)}"
    if not value:
        return "must hold at least one storage (one for FullyContiguous, one per layer for LayerSeparate), got []"
    for i, item in enumerate(value):
        if not isinstance(item, Storage):
            return f"item {i} must be a storage (with kind, addr, size), got {show(item)}"
        if not isinstance(item.kind, StorageKind):
            return f"item {i} must have a StorageKind as its kind, got {show(item.kind)}"
    return None


_allocator_shape = duck(("storage_kind", "allocate"), "a storage allocator (with storage_kind and allocate())")


def _allocator_check(value: object) -> str | None:
    if value is None or type(value) in BUILTIN_ALLOCATORS:
        return None
    message = _allocator_shape(value)
    if message is None and not isinstance(value.storage_kind, StorageKind):  # type: ignore[attr-defined]
        # the tier slot is chosen by this kind: anything else could never match one
        return f"must have a StorageKind as its storage_kind, got {show(value.storage_kind)}"  # type: ignore[attr-defined]
    return message


@attrs.frozen(kw_only=True)
class KvManagerLayoutConfig(Validated, Generic[S]):
    """A tier's layout. Its memory comes from exactly one of ``storage`` (memory allocated beforehand),
    ``allocator`` or ``logical`` (blocks on other workers). ``alignment`` (default 1, a power of two) pads each
    block (or region) so every block starts on an aligned address."""

    _kvbm_root: ClassVar[str] = "layout"

    num_blocks: int = field(rule=integer(min=1, max=U64_MAX), doc="Blocks in this tier.")
    layout_type: LayoutType = field(
        default=_FULLY_CONTIGUOUS,
        **spelled(LayoutType.parse, LayoutType, names=LAYOUT_NAMES),
        doc="FullyContiguous, LayerSeparateOuterContiguous or LayerSeparateBlockContiguous "
        "(case, '_' and '-' ignored), or {LayerSeparate = {outer_contiguous = true}}.",
    )
    storage: Sequence[S] | None = field(
        default=None,
        converter=_storages,
        document=False,
        rule=Rule(_storages_check),
        doc="Memory allocated beforehand: one storage (FullyContiguous) or one per layer (LayerSeparate).",
    )
    allocator: BuiltinAllocator | StorageAllocator | None = field(
        default=None, rule=Rule(_allocator_check), doc="How this tier's memory is made."
    )
    logical: BlockParallelismStrategy | None = field(
        default=None,
        **spelled(
            BlockParallelismStrategy.parse,
            BlockParallelismStrategy,
            names=(("LeaderWorkerSharded",), "words"),
            nullable=True,
        ),
        doc="Blocks sharded across workers under a leader, instead of an allocator.",
    )
    offload_filter: OffloadFilter | None = field(
        default=None,
        eq=False,
        document=False,
        rule=optional(duck(("should_offload",), "an offload filter (should_offload())")),
        doc="Decides which blocks of this tier are offloaded to the next lower tier.",
    )
    alignment: int = field(
        default=1, rule=power_of_two, doc="Each block starts on a multiple of this (a power of two)."
    )

    @classmethod
    def _relations(cls, get: Callable[[str], Any], bad: frozenset[str]) -> list[Problem]:
        if (get("storage") is None) + (get("allocator") is None) + (get("logical") is None) == 2:
            return []  # the usual case, without building a list: every layout construction runs this
        chosen = [name for name in CHOICES if get(name) is not None]
        if len(chosen) == 1:
            return []
        if chosen:
            return [Problem((chosen[1],), exclusive_message(chosen))]
        return [Problem((), "must provide either `storage` or `allocator` or `logical`")]

    @property
    def storage_kind(self) -> Any:
        """The kind of memory backing this tier, when an allocator or storages say so (else None)."""
        if self.allocator is not None:
            return self.allocator.storage_kind
        if self.storage:
            return self.storage[0].kind
        return None

    @staticmethod
    def builder() -> KvManagerLayoutConfigBuilder[Any]:
        return KvManagerLayoutConfigBuilder()


class BlockShape(Protocol):
    """What :func:`span_bytes` needs of a model (a :class:`~kvbm_builder.config.KvManagerModelConfig`, or a
    :class:`~kvbm_builder.layout.LayoutSpec`)."""

    @property
    def num_layers(self) -> int: ...
    @property
    def outer_dim(self) -> int: ...
    @property
    def region_bytes(self) -> int: ...


def span_bytes(shape: BlockShape, num_blocks: int, layout_type: LayoutType, alignment: int) -> int:
    """The bytes a tier of ``num_blocks`` blocks asks its allocators for, alignment padding included: the one rule
    both the configuration's check (at most 2**63 - 1) and the layout (``LayoutSpec.total_bytes``) use.

    Each block's stride is padded up to ``alignment`` (for LayerSeparate, its part in one layer: the whole part, or
    one region when outer-contiguous), the last block of a FullyContiguous tier is not, and each allocation (one,
    or one per layer) gets ``alignment - 1`` bytes more, to align its start wherever the allocator puts it."""
    region = shape.region_bytes
    in_layer = shape.outer_dim * region  # a block's part in one layer
    if isinstance(layout_type, LayerSeparate):
        if layout_type.outer_contiguous:
            data = align_up(region, alignment) * num_blocks * shape.outer_dim
        else:
            data = align_up(in_layer, alignment) * num_blocks
        return shape.num_layers * (data + alignment - 1)
    natural = shape.num_layers * in_layer
    return (num_blocks - 1) * align_up(natural, alignment) + natural + alignment - 1


def exclusive_message(chosen: Sequence[str]) -> str:
    return (
        f"only one of `storage`, `allocator` or `logical` may be chosen, but {', '.join(f'`{c}`' for c in chosen)}"
        " were set"
    )


class KvManagerLayoutConfigBuilder(Builder[KvManagerLayoutConfig[S]], Generic[S]):
    _target = KvManagerLayoutConfig

    def num_blocks(self, value: int) -> KvManagerLayoutConfigBuilder[S]:
        return self._set("num_blocks", value)

    def layout_type(self, value: LayoutType | str) -> KvManagerLayoutConfigBuilder[S]:
        """A LayoutType, or one of its names (normalised as upstream: case, ``_`` and ``-`` ignored)."""
        return self._set("layout_type", value)

    def storage(self, value: Sequence[S] | None) -> KvManagerLayoutConfigBuilder[S]:
        """Memory allocated beforehand: one storage (FullyContiguous) or one per layer (LayerSeparate)."""
        return self._set("storage", value)

    def allocator(self, allocator: BuiltinAllocator | StorageAllocator) -> KvManagerLayoutConfigBuilder[S]:
        """Custom setter: the allocator that makes this tier's memory (e.g. ``DeviceAllocator(device_id=0)``).
        ``None`` is refused here, as upstream's setter takes no Option: leave it unset instead."""
        if allocator is None:
            return self._reject(
                "allocator", "allocator() needs an allocator, got None; choose storage(...) or logical(...) instead"
            )
        return self._set("allocator", allocator)

    def logical(self, value: BlockParallelismStrategy | None) -> KvManagerLayoutConfigBuilder[S]:
        return self._set("logical", value)

    def offload_filter(self, value: OffloadFilter | None) -> KvManagerLayoutConfigBuilder[S]:
        return self._set("offload_filter", value)

    def alignment(self, value: int) -> KvManagerLayoutConfigBuilder[S]:
        return self._set("alignment", value)

    def _validate(self) -> list[Problem]:
        values, rejected = self._values, self._rejected
        if ("storage" in values) + ("allocator" in values) + ("logical" in values) == 1 and not rejected:
            return []  # the usual case: one choice, and no refused value that might be another
        chosen = [name for name in CHOICES if name in values or name in rejected]
        if not chosen:
            return [Problem((), "must provide either `storage` or `allocator` or `logical`")]
        if len(chosen) > 1:
            return [Problem((chosen[1],), exclusive_message(chosen))]
        return []
