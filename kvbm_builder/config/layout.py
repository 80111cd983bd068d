"""``KvManagerLayoutConfig``: how many blocks a tier holds, in what layout, backed by what memory."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import attrs

from ..errors import ConfigError, Problem
from ._builder import Builder
from ._rules import Validated, has_attributes, instance, integer, optional, power_of_two, rule, show
from .allocators import BUILTIN_ALLOCATORS, BuiltinAllocator
from .protocols import OffloadFilter, Storage, StorageAllocator, StorageKind

S = TypeVar("S", bound=Storage)


_CHOICES = ("storage", "allocator", "logical")  # upstream's exclusive choice, in declaration order


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
            key = value.lower().replace("_", "").replace("-", "")
            if key == "fullycontiguous":
                return FullyContiguous()
            if key == "layerseparateoutercontiguous":
                return LayerSeparate(outer_contiguous=True)
            if key == "layerseparateblockcontiguous":
                return LayerSeparate(outer_contiguous=False)
            raise ConfigError([Problem((), f"unknown layout {value!r}; accepted: {', '.join(LayoutType.ACCEPTED)}")])
        if isinstance(value, Mapping) and len(value) == 1:
            ((name, body),) = value.items()
            if isinstance(name, str) and name.lower().replace("_", "") == "layerseparate":
                if isinstance(body, Mapping) and set(body) == {"outer_contiguous"}:
                    flag = body["outer_contiguous"]
                    if isinstance(flag, bool):
                        return LayerSeparate(outer_contiguous=flag)
                raise ConfigError(
                    [Problem((), f"LayerSeparate needs {{'outer_contiguous': true|false}}, got {body!r}")]
                )
            if isinstance(name, str) and name.lower().replace("_", "") == "fullycontiguous" and not body:
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


class BlockParallelismStrategy(enum.Enum):
    """KV blocks are sharded across all workers under a leader."""

    LeaderWorkerSharded = "leader_worker_sharded"


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


_allocator_shape = has_attributes(
    ("storage_kind", "allocate"), "a storage allocator (with storage_kind and allocate())"
)


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
    """A tier's layout. Exactly one of ``storage``, ``allocator`` or ``logical`` is chosen with the builder
    (upstream's rule: a setter called with ``None`` still counts). ``alignment`` (default 1, a power of two)
    pads each block (or region) so every block starts on an aligned address."""

    _kvbm_root: ClassVar[str] = "layout"

    num_blocks: int = attrs.field(metadata=rule(integer(min=1)))
    layout_type: LayoutType = attrs.field(
        default=_FULLY_CONTIGUOUS,
        metadata=rule(instance(LayoutType, what="a LayoutType (FullyContiguous() or LayerSeparate(...))")),
    )
    storage: Sequence[S] | None = attrs.field(
        default=None,
        metadata=rule(_storages_check),
    )
    allocator: BuiltinAllocator | StorageAllocator | None = attrs.field(default=None, metadata=rule(_allocator_check))
    logical: BlockParallelismStrategy | None = attrs.field(
        default=None,
        metadata=rule(optional(instance(BlockParallelismStrategy, what="a BlockParallelismStrategy or None"))),
    )
    offload_filter: OffloadFilter | None = attrs.field(
        default=None,
        eq=False,
        metadata=rule(optional(has_attributes(("should_offload",), "an offload filter (should_offload())"))),
    )
    alignment: int = attrs.field(default=1, metadata=rule(power_of_two))

    @classmethod
    def _cross_check(cls, good: Mapping[str, object], values: Mapping[str, object]) -> list[Problem]:
        get = values.get
        if (get("storage") is None) + (get("allocator") is None) + (get("logical") is None) >= 2:
            return []  # the usual case, checked without building a list
        chosen = [name for name in _CHOICES if get(name) is not None]
        if len(chosen) > 1:
            return [Problem((chosen[1],), exclusive_message(chosen))]
        return []

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
        if isinstance(value, str):
            try:
                return self._set("layout_type", LayoutType.parse(value))
            except ConfigError as err:
                return self._reject("layout_type", err.problems[0].message)
        return self._set("layout_type", value)

    def storage(self, value: Sequence[S] | None) -> KvManagerLayoutConfigBuilder[S]:
        """Memory allocated beforehand: one storage (FullyContiguous) or one per layer (LayerSeparate)."""
        return self._set("storage", tuple(value) if isinstance(value, list) else value)

    def allocator(self, allocator: BuiltinAllocator | StorageAllocator) -> KvManagerLayoutConfigBuilder[S]:
        """Custom setter: the allocator that makes this tier's storages (e.g. ``DeviceAllocator(0)``)."""
        return self._set("allocator", allocator)

    def logical(self, value: BlockParallelismStrategy | None) -> KvManagerLayoutConfigBuilder[S]:
        return self._set("logical", value)

    def offload_filter(self, value: OffloadFilter | None) -> KvManagerLayoutConfigBuilder[S]:
        return self._set("offload_filter", value)

    def alignment(self, value: int) -> KvManagerLayoutConfigBuilder[S]:
        return self._set("alignment", value)

    def _validate(self) -> list[Problem]:
        chosen = [name for name in _CHOICES if name in self._values or name in self._rejected]
        if not chosen:
            return [Problem((), "must provide either `storage` or `allocator` or `logical`")]
        if len(chosen) > 1:
            return [Problem((chosen[1],), exclusive_message(chosen))]
        return []
