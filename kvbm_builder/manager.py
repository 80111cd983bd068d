"""``KvBlockManager``: a validated config turned into real, registered memory.

It composes what the layers below computed: the config says what to build, ``LayoutSpec`` how big each
allocation is, the allocators make the memory, ``Layout`` places the regions in it, and the NIXL registry
makes it reachable by peers. Tiers are brought up in the order device, host, disk; if any step fails,
everything already done is undone (registrations first, then memory, newest first) before the error is raised.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .config.env import DYN_KVBM_METRICS
from .config.layout import FullyContiguous, KvManagerLayoutConfig, LayerSeparate
from .config.manager import KvBlockManagerConfig, KvBlockManagerConfigBuilder
from .config.protocols import Storage, StorageKind, Tier
from .config.runtime import CancellationToken
from .errors import (
    AllocationError,
    ConfigError,
    KvbmError,
    LayoutError,
    MetricsError,
    MetricsRegistryError,
    OffloadError,
    Problem,
    ReleaseError,
    UnknownTierError,
    show,
)
from .layout import Layout, LayoutSpec, MemoryRegion
from .storage import StorageClosedError, allocate

if TYPE_CHECKING:
    from .blocks import BlockPool, ImmutableBlock, MutableBlock, TokenBlock
    from .config.settings import KvbmSettings
    from .metrics import KvbmMetrics, MetricsServer, NullKvbmMetrics
    from .nixl import NixlRegistry
    from .offload import BlockFuture, KvbmStats, Listener, OffloadManager, OffloadResult, PrefixMatch

log = logging.getLogger(__name__)

__all__ = ["KvBlockManager", "KvBlockManagerBuilder", "ReleaseError", "TierStorage"]


class TierStorage:
    """One allocated tier: its layout, its storages and zero-copy views of its blocks."""

    __slots__ = ("_released", "bringup_seconds", "config", "layout", "owned", "spec", "tier")

    def __init__(
        self,
        tier: Tier,
        config: KvManagerLayoutConfig[Any],
        layout: Layout | None,
        owned: bool,
        bringup_seconds: float,
    ) -> None:
        self.tier = tier
        self.config = config
        self.layout = layout
        self.spec: LayoutSpec | None = layout.spec if layout is not None else None
        self.owned = owned
        self.bringup_seconds = bringup_seconds
        self._released = False

    @property
    def storages(self) -> tuple[Storage, ...]:
        return self.layout.storages if self.layout is not None else ()

    @property
    def kind(self) -> StorageKind | None:
        return self.storages[0].kind if self.storages else None

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.storages)

    def _layout(self) -> Layout:
        if self._released:
            raise StorageClosedError(
                f"the {self.tier.words} was released when its KvBlockManager closed; its addresses and views are gone"
            )
        if self.layout is None:
            raise LayoutError(
                f"the {self.tier.words} is logical ({self.config.logical}): its blocks live on other workers, "
                "so it has no local memory to address"
            )
        return self.layout

    def memory_region(self, block: int, layer: int, outer: int) -> MemoryRegion:
        """(address, size, kind) of one region; for the disk tier the address is the file offset."""
        return self._layout().memory_region(block, layer, outer)

    def views(self, dtype: Any = None) -> list[Any]:
        """Zero-copy arrays over the tier's memory, one per storage, shaped as the layout:

        - FullyContiguous: ``[num_blocks, num_layers, outer_dim, page_size, inner_dim]``
        - LayerSeparate(outer_contiguous=True), per layer: ``[outer_dim, num_blocks, page_size, inner_dim]``
        - LayerSeparate(outer_contiguous=False), per layer: ``[num_blocks, outer_dim, page_size, inner_dim]``

        cupy arrays for device memory, numpy arrays for host memory. ``dtype`` defaults to the unsigned integer of
        the model's width; any plain numeric dtype of that width works (e.g. ``float16``); object, structured,
        string, boolean and datetime dtypes are refused (LayoutError). Alignment padding shows in the strides.

        The arrays keep the memory alive: after ``close()`` (or when the manager is collected unclosed) they still
        work, and the memory is released when the last of them (and of the views made from them) is gone.
        """
        layout = self._layout()
        spec = layout.spec
        kind = self.kind
        if kind is StorageKind.DISK:
            raise LayoutError(
                "the disk tier (G3) is a file: it has no array view; read and write it with "
                "storage.read_into(offset, buf) / storage.write(offset, data) at memory_region(...).addr"
            )
        if kind is StorageKind.DEVICE:
            import cupy as xp
        else:
            import numpy as xp
        width = spec.dtype_width_bytes
        dt = _plain_dtype(xp, dtype, width, self.tier)
        token = spec.inner_dim * width
        if isinstance(spec.layout_type, FullyContiguous):
            shape: tuple[int, ...] = (spec.num_blocks, spec.num_layers, spec.outer_dim, spec.page_size, spec.inner_dim)
            strides: tuple[int, ...] = (
                spec.block_stride,
                spec.outer_dim * spec.region_bytes,
                spec.region_bytes,
                token,
                width,
            )
        elif isinstance(spec.layout_type, LayerSeparate) and spec.layout_type.outer_contiguous:
            shape = (spec.outer_dim, spec.num_blocks, spec.page_size, spec.inner_dim)
            strides = (spec.outer_stride, spec.block_stride, token, width)
        else:
            shape = (spec.num_blocks, spec.outer_dim, spec.page_size, spec.inner_dim)
            strides = (spec.block_stride, spec.region_bytes, token, width)
        out = []
        for storage, base in zip(layout.storages, layout.base_addrs, strict=True):
            raw = _raw_view(storage)
            start = base - storage.addr
            if kind is StorageKind.DEVICE:
                out.append(xp.ndarray(shape, dt, memptr=raw.data + start, strides=strides))
            else:
                out.append(xp.ndarray(shape, dt, buffer=raw, offset=start, strides=strides))
        return out

    def torch_views(self, dtype: Any = None) -> list[Any]:
        """The device tier's views as torch tensors through DLPack (no copy), e.g. ``dtype=torch.bfloat16``,
        so an engine can use the tier as its KV cache. ``dtype`` is a floating, complex or integer torch dtype of
        the model's width. The tensors keep the memory alive, as :meth:`views` do."""
        if self.kind is not StorageKind.DEVICE:
            raise LayoutError(f"torch views are for the device tier (G1); the {self.tier.words} gives numpy views")
        import torch
        from torch.utils.dlpack import from_dlpack

        width = self._layout().spec.dtype_width_bytes
        if dtype is not None:
            _check_torch_dtype(torch, dtype, width, self.tier)
        tensors = [from_dlpack(v) for v in self.views()]
        return [t.view(dtype) for t in tensors] if dtype is not None else tensors

    def __repr__(self) -> str:
        kind = self.kind.value if self.kind else "logical"
        return f"TierStorage({self.tier.name}, {kind}, blocks={self.num_blocks}, bytes={self.nbytes})"


_NUMERIC = {1: "uint8, int8", 2: "uint16, int16, float16", 4: "uint32, int32, float32", 8: "uint64, int64, float64"}


def _shown(value: object) -> str:
    """``repr(value)`` for a message, bounded, never raising (a 5,000-digit int, a broken __repr__)."""
    try:
        text = repr(value)
    except Exception:
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _plain_dtype(xp: Any, dtype: Any, width: int, tier: Tier) -> Any:
    """``dtype`` as a numpy/cupy dtype when it is a plain number (integer, float, complex) ``width`` bytes wide."""
    try:
        dt = xp.dtype(dtype if dtype is not None else f"u{width}")
    except Exception as err:  # numpy says TypeError, ValueError or OverflowError, depending on what it was given
        raise LayoutError(f"{tier.words}: {_shown(dtype)} is not a dtype ({type(err).__name__}: {err})") from None
    if dt.kind not in "iufc":  # object (pointers), structured, void, string, bool, datetime: not numbers
        raise LayoutError(
            f"{tier.words}: views need a plain numeric dtype {width} bytes wide (the model's dtype_width_bytes), "
            f"e.g. numpy.{_NUMERIC[width].split(', ')[-1]} ({_NUMERIC[width]}; numpy.uint{8 * width} is the default), "
            f"got {_shown(dt)}: object, structured, string, boolean and datetime dtypes cannot view raw cache memory"
        )
    if dt.itemsize != width:
        raise LayoutError(f"dtype {dt} is {dt.itemsize} bytes wide but the model's dtype_width_bytes is {width}")
    return dt


def _check_torch_dtype(torch: Any, dtype: Any, width: int, tier: Tier) -> None:
    """A torch dtype fit to view the cache: floating, complex or integer (not bool or quantized), ``width`` wide."""
    numeric = isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)
    if isinstance(dtype, torch.dtype) and not numeric:
        try:
            torch.iinfo(dtype)  # integers only: bool and quantized dtypes are refused
            numeric = True
        except TypeError:
            numeric = False
    if not numeric or dtype.itemsize != width:
        raise LayoutError(
            f"{tier.words}: torch views need a floating, complex or integer torch dtype {width} bytes wide (the "
            f"model's dtype_width_bytes), e.g. torch.bfloat16 or torch.float16 for 2 bytes; got {_shown(dtype)}"
        )


def _raw_view(storage: Storage) -> Any:
    for name in ("as_cupy", "as_numpy"):
        method: Callable[[], Any] | None = getattr(storage, name, None)
        if method is not None:
            return method()
    raise LayoutError(f"storage {show(storage, typed=False)} offers no array view (as_cupy() or as_numpy())")


class KvBlockManager:
    """The tiers of a :class:`KvBlockManagerConfig`, allocated and registered.

    Use as a context manager, or call :meth:`close`: registrations are removed before memory is freed. A manager
    collected without ``close()`` is closed then. Views (``tier(...).views()``, ``torch_views()``) keep the memory
    they show alive either way: it is released when the last of them is gone.

    If the bring-up fails, everything made so far is released before the error is raised; what could not be
    released (memory NIXL would not deregister, a file that could not be removed) is kept, and the error's
    ``release_error`` (a :class:`ReleaseError`) names it: ``release_error.manager.close()`` retries.

    What moves, is skipped and is found is counted in :attr:`metrics` (the config's ``kvbm_metrics``, or KvbmMetrics
    of the manager's own on ``runtime.metrics_registry``), served on ``/metrics`` when ``settings.metrics``
    (``DYN_KVBM_METRICS``) is true or :meth:`serve_metrics` is called; the endpoint closes with the manager.
    """

    def __init__(self, config: KvBlockManagerConfig, *, settings: KvbmSettings | None = None) -> None:
        if not isinstance(config, KvBlockManagerConfig):
            message = (
                f"KvBlockManager needs a KvBlockManagerConfig, got {type(config).__name__}; "
                "build one with KvBlockManagerConfig.builder() or kvbm_builder.load()"
            )
            raise ConfigError([Problem((), message)])
        self.config = config
        if settings is None:
            from .config.settings import settings_from_env

            settings = settings_from_env()
        self.settings: KvbmSettings = settings
        """Transfer batch size and concurrency, the disk offload filter switch, metrics (default: the environment)."""
        self._blocks: OffloadManager | None = None
        # cancelling the caller's token stops this manager; closing this manager leaves the caller's token alone
        self.cancellation_token: CancellationToken = config.runtime.cancellation_token.child_token()
        self._tiers: dict[Tier, TierStorage] = {}
        self._owned: list[Storage] = []
        self._nixl: NixlRegistry | None = None
        self._metrics: KvbmMetrics | NullKvbmMetrics | None = None
        self._owns_metrics = False  # made here (on runtime.metrics_registry), so closed here
        self._metrics_server: MetricsServer | None = None
        self._metrics_released = False
        self._closed = False
        try:
            self._bring_up()
        except BaseException as failure:
            try:
                self.close()
            except BaseException as cleanup:  # the bring-up failure is the news; say what cleanup hit too
                _note(failure, f"while releasing what was already allocated: {type(cleanup).__name__}: {cleanup}")
                if isinstance(cleanup, ReleaseError):
                    # what is kept stays reachable from the error: release_error.manager.close() retries it
                    failure.release_error = cleanup  # type: ignore[attr-defined]
            raise

    @staticmethod
    def builder() -> KvBlockManagerBuilder:
        return KvBlockManagerBuilder()

    # -- bring-up -------------------------------------------------------------------------------------------

    def _bring_up(self) -> None:
        config = self.config
        self._metrics = self._take_metrics()  # first: a registry or port already taken fails before any allocation
        if self.settings.metrics:
            if self._metrics.enabled:
                self.serve_metrics()
            else:
                log.warning(
                    "%s asks for /metrics, but the config's kvbm_metrics is NullKvbmMetrics (metrics switched off): "
                    "nothing is served",
                    DYN_KVBM_METRICS,
                )
        tiers = config.tiers()
        if config.runtime.nixl.enabled:
            from .nixl import NixlRegistry

            self._nixl = NixlRegistry(
                config.runtime.nixl,
                config.runtime.worker_id,
                with_files=any(t is Tier.G3 for t, _ in tiers),
            )
        for tier, layout_config in tiers:
            started = time.perf_counter()
            try:
                spec = LayoutSpec.from_config(config.model, layout_config)
            except ConfigError as err:  # say which tier (the spec alone does not know)
                raise err.rerooted(tier.slot) from None
            if layout_config.logical is not None:
                self._tiers[tier] = TierStorage(tier, layout_config, None, False, 0.0)
                continue
            storages, owned = self._storages_for(tier, layout_config, spec)
            try:
                layout = Layout(spec, storages)
            except LayoutError as err:
                raise LayoutError(f"{tier.words}: {err}") from err
            if self._nixl is not None:
                for storage in storages:
                    self._nixl.register(storage, tier)
            elapsed = time.perf_counter() - started
            self._tiers[tier] = TierStorage(tier, layout_config, layout, owned, elapsed)
            log.info("%s: %d blocks, %d bytes in %.3f s", tier.words, spec.num_blocks, spec.total_bytes, elapsed)
        self._blocks = self._offload_manager()
        self._blocks.report_to(self._metrics)
        for tier, t in self._tiers.items():
            self._metrics.set_allocated_bytes(tier, t.nbytes)

    def _take_metrics(self) -> KvbmMetrics | NullKvbmMetrics:
        """The config's ``kvbm_metrics``, or KvbmMetrics of this manager's own on ``runtime.metrics_registry``."""
        from .metrics import KvbmMetrics

        given = self.config.kvbm_metrics
        if given is not None:
            if given.closed:
                raise MetricsError(
                    "kvbm_metrics: these KvbmMetrics were closed (their names are off their registry); give the "
                    "config new ones, or leave kvbm_metrics unset for the manager to make its own"
                )
            if given.block_counts_source is not None:
                raise MetricsError(
                    "kvbm_metrics: these KvbmMetrics already count the blocks of another KvBlockManager that is "
                    "open (one set of metrics per manager); close that manager first, or give this one its own "
                    "KvbmMetrics (or leave kvbm_metrics unset)"
                )
            return given
        try:
            made = KvbmMetrics(
                self.config.runtime.metrics_registry,
                cache_stats_max_requests=self.settings.cache_stats_max_requests,
            )
        except MetricsRegistryError as err:
            held = sorted(getattr(err.__cause__, "duplicates", None) or ["kvbm_*"])
            raise MetricsRegistryError(
                f"runtime.metrics_registry already holds KVBM's metrics ({', '.join(held[:3])}"
                f"{', ...' if len(held) > 3 else ''}): another KvBlockManager "
                "made from a config with this runtime config (or registry) is open, or something else registered "
                "these names. Give each manager its own KvManagerRuntimeConfig (each makes a fresh registry), close "
                "the other manager first, or set the config's kvbm_metrics (NullKvbmMetrics() counts nothing)"
            ) from err
        self._owns_metrics = True
        return made

    def _offload_manager(self) -> OffloadManager:
        """Block pools for the tiers with local memory, and what moves blocks between them."""
        from .config.env import should_bypass_cpu_cache
        from .offload import OffloadManager

        layouts = {tier: t.layout for tier, t in self._tiers.items() if t.layout is not None}
        device = self._tiers.get(Tier.G1)
        return OffloadManager.for_tiers(
            layouts,
            block_size=self.config.model.page_size,
            filters={tier: t.config.offload_filter for tier, t in self._tiers.items()},
            event_manager=self.config.event_manager,
            cancellation_token=self.cancellation_token,
            max_batch_blocks=self.settings.max_transfer_batch_size,
            max_concurrent=self.settings.max_concurrent_transfers,
            bypass_cpu_cache=should_bypass_cpu_cache(),
            disk_offload_filter=self.settings.disk_offload_filter,
            device_id=getattr(device.storages[0], "device_id", None) if device and device.storages else None,
        )

    def _storages_for(
        self, tier: Tier, layout_config: KvManagerLayoutConfig[Any], spec: LayoutSpec
    ) -> tuple[Sequence[Storage], bool]:
        if layout_config.storage is not None:
            return tuple(layout_config.storage), False
        allocator = layout_config.allocator
        if allocator is None:
            raise AllocationError(
                f"the {tier.words} has no memory: `storage` was set to None and no allocator was given; "
                f"set `{tier.slot}` with .allocator(...) (e.g. {_example_allocator(tier)}) or .storage([...])"
            )
        for _ in range(spec.num_allocations):
            storage = None
            try:
                storage = allocate(allocator, spec.allocation_bytes)
                self._owned.append(storage)
            except KvbmError:
                raise
            except Exception as err:  # a user's allocator: say which tier it failed for
                raise AllocationError(
                    f"the {tier.words}'s allocator {show(allocator, typed=False)} failed to allocate "
                    f"{spec.allocation_bytes} bytes: "
                    f"{type(err).__name__}: {err}"
                ) from err
            except BaseException:  # an interrupt between the allocation and its record: nobody else will close it
                if storage is not None and not any(s is storage for s in self._owned):
                    _close_quietly(storage)
                raise
            kind = getattr(storage, "kind", None)
            # hasattr, not isinstance(Storage): from Python 3.12 protocol checks ignore attributes a proxy's
            # __getattr__ provides
            if not all(hasattr(storage, a) for a in ("addr", "size")) or not any(kind is k for k in tier.accepts):
                self._owned.pop()
                close = getattr(storage, "close", None)
                if callable(close):
                    close()
                accepted = " or ".join(sorted(k.value for k in tier.accepts))
                raise AllocationError(
                    f"the {tier.words}'s allocator {show(allocator, typed=False)} returned "
                    f"{show(storage, typed=False)}, not a storage of {accepted} "
                    "memory (an object with kind, addr and size); fix the allocator's allocate()"
                )
        return tuple(self._owned[-spec.num_allocations :]), True

    # -- access ---------------------------------------------------------------------------------------------

    @property
    def worker_id(self) -> int:
        return self.config.runtime.worker_id

    @property
    def tiers(self) -> dict[Tier, TierStorage]:
        return dict(self._tiers)

    def tier(self, tier: Tier | str) -> TierStorage:
        """A tier by ``Tier.G2``, ``"G2"`` or its slot name ``"host_layout"``."""
        key = _tier_key(tier)
        found = self._tiers.get(key)
        if found is None:
            raise UnknownTierError(
                f"the {key.words} is not configured; set `{key.slot}` on the builder "
                f"(configured: {', '.join(t.name for t in self._tiers) or 'none'})"
            )
        return found

    @property
    def device(self) -> TierStorage | None:
        return self._tiers.get(Tier.G1)

    @property
    def host(self) -> TierStorage | None:
        return self._tiers.get(Tier.G2)

    @property
    def disk(self) -> TierStorage | None:
        return self._tiers.get(Tier.G3)

    @property
    def nixl_agent(self) -> Any:
        """The NIXL agent the tiers are registered with (None when NIXL is disabled)."""
        return self._nixl.agent if self._nixl is not None else None

    @property
    def metrics_registry(self) -> Any:
        return self.config.runtime.metrics_registry

    # -- metrics --------------------------------------------------------------------------------------------

    @property
    def metrics(self) -> KvbmMetrics | NullKvbmMetrics:
        """What counts this manager's transfers, skips and lookups: the config's ``kvbm_metrics``, or KvbmMetrics
        the manager made on ``runtime.metrics_registry`` (closed, and so taken off the registry, by :meth:`close`)."""
        if self._metrics is None:
            raise MetricsError("this KvBlockManager did not come up; it has no metrics")
        return self._metrics

    @property
    def metrics_server(self) -> MetricsServer | None:
        """The endpoint serving this manager's metrics (``DYN_KVBM_METRICS``, or :meth:`serve_metrics`), if any."""
        return self._metrics_server

    def serve_metrics(self, port: int | None = None, host: str = "127.0.0.1") -> MetricsServer:
        """Serve this manager's metrics on ``http://host:port/metrics`` until :meth:`close` closes the endpoint.

        ``port``: ``settings.metrics_port`` (``DYN_KVBM_METRICS_PORT``, 6880) when left out; 0 lets the OS pick one
        (``server.url`` says which). Bound to 127.0.0.1 unless ``host`` names another address of this machine.
        With ``DYN_KVBM_METRICS`` true (``settings.metrics``) the bring-up calls it; one endpoint per manager.
        A port in use is a :class:`~kvbm_builder.errors.MetricsServerError` naming ``DYN_KVBM_METRICS_PORT``.
        """
        from .metrics import KvbmMetrics

        metrics = self.metrics
        if self._metrics_released:
            raise MetricsError("this KvBlockManager is closed: its metrics are no longer served")
        if not isinstance(metrics, KvbmMetrics):
            raise MetricsError(
                "this KvBlockManager counts nothing (its config's kvbm_metrics is NullKvbmMetrics), so there is "
                "nothing to serve; leave kvbm_metrics unset, or give the config a KvbmMetrics"
            )
        if self._metrics_server is not None:
            raise MetricsError(
                f"this KvBlockManager already serves its metrics at {self._metrics_server.url} (one endpoint per "
                "manager); scrape that one"
            )
        self._metrics_server = metrics.serve(self.settings.metrics_port if port is None else port, host)
        return self._metrics_server

    def _release_metrics(self) -> None:
        """Stop the endpoint, report no bytes allocated, and close the metrics if this manager made them. Once."""
        metrics = self._metrics
        if metrics is None or self._metrics_released:
            return
        self._metrics_released = True
        server, self._metrics_server = self._metrics_server, None
        try:
            if server is not None:
                server.close()
            for tier in self._tiers:
                metrics.set_allocated_bytes(tier, 0)
        finally:
            if self._owns_metrics:
                metrics.close()

    def memory_region(self, tier: Tier | str, block: int, layer: int, outer: int) -> MemoryRegion:
        return self.tier(tier).memory_region(block, layer, outer)

    # -- release --------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop moving blocks, close the metrics endpoint, deregister from NIXL, then free memory and remove files,
        newest first. Idempotent.

        Memory that a view still uses is left to the views and released with the last of them. What cannot be
        released stays allocated and the manager stays open: memory NIXL could not deregister (never freed under a
        live registration), and storages whose release failed (e.g. a file that could not be removed). The
        :class:`ReleaseError` raised names them (``unreleased``); calling close() again retries exactly those. An
        interrupted close() is finished by calling it again.
        """
        if self._closed:
            return
        errors: list[BaseException] = []
        if self._blocks is not None and not self._blocks.closed:
            try:  # no transfer may touch the memory once it is released
                self._blocks.close()
            except Exception as err:
                errors.append(err)
        try:  # the endpoint closes with the manager, even when some memory below cannot be released yet
            self._release_metrics()
        except Exception as err:
            errors.append(err)
        registry = self._nixl
        if registry is not None and not registry.closed:
            try:
                registry.close()
            except Exception as err:  # keep freeing what is safe to free; report after
                errors.append(err)
        # what NIXL still holds, by the registry's own record (exact after any failure): never freed now
        held = [r.storage for r in registry.registrations] if registry is not None and not registry.closed else []
        for tier in self._tiers.values():
            tier._released = True
        kept: list[Storage] = []
        while self._owned:
            storage = self._owned[-1]
            if not any(storage is h for h in held):
                try:
                    close: Callable[[], None] | None = getattr(storage, "close", None)
                    if close is not None:
                        close()
                except Exception as err:
                    errors.append(err)
                    kept.append(storage)
            else:
                kept.append(storage)
            self._owned.pop()
        self._owned = kept[::-1]
        if not self._owned and (registry is None or registry.closed):
            self._closed = True
            self.cancellation_token.cancel()
        if errors:
            retry = (
                f"; kept {len(kept)} storage(s) ({len(held)} still registered with NIXL): call close() again to retry"
                if kept
                else ""
            )
            first = f"{type(errors[0]).__name__}: {errors[0]}"
            raise ReleaseError(
                f"releasing the tiers hit {len(errors)} error(s); first: {first}{retry}",
                kept,
                self,
                errors,
            ) from errors[0]

    # -- blocks: allocate, register, match, offload, onboard -------------------------------------------------

    @property
    def offload_manager(self) -> OffloadManager:
        """The pools, filters and transfer engine that move this manager's blocks."""
        if self._blocks is None:
            raise OffloadError("this KvBlockManager did not come up; it has no blocks to move")
        return self._blocks

    def pool(self, tier: Tier | str) -> BlockPool:
        """The block pool of a tier with local memory (``"G1"``, ``Tier.G2``, ``"disk_layout"``...)."""
        return self.offload_manager.pool(_tier_key(tier))

    def allocate(self, tier: Tier | str, count: int = 1) -> list[MutableBlock]:
        """``count`` blocks of a tier to write into (free ones first, then evicted inactive ones); all or none."""
        return self.pool(tier).allocate(count)

    def token_blocks(
        self,
        tokens: Sequence[int],
        *,
        parent: TokenBlock | int | None = None,
        external_hashes: Sequence[int] | None = None,
    ) -> list[TokenBlock]:
        """``tokens`` cut into full blocks of the model's ``page_size`` and hashed as Dynamo's router does."""
        from .blocks import token_blocks

        return token_blocks(tokens, self.config.model.page_size, parent=parent, external_hashes=external_hashes)

    def register(
        self,
        blocks: Sequence[MutableBlock],
        *,
        tokens: Sequence[int] | None = None,
        hashes: Sequence[int] | None = None,
        token_blocks: Sequence[TokenBlock] | None = None,
        parent: TokenBlock | int | None = None,
        priority: int = 0,
    ) -> list[ImmutableBlock]:
        """Register written blocks (one tier) by exactly one of:

        - ``tokens``: their token ids, hashed here (one full ``page_size`` block per block; a partial tail is
          ignored), chained from ``parent``;
        - ``hashes``: an engine's own hash per block (chained from ``parent`` for the events);
        - ``token_blocks``: made beforehand (:meth:`token_blocks`, ``TokenBlock.from_hash``).

        Returns registered blocks, in order; a hash the tier already holds returns that block (see ``BlockPool``).
        """
        from .blocks import TokenBlock
        from .errors import BlockPoolError

        blocks = list(blocks)
        if sum(x is not None for x in (tokens, hashes, token_blocks)) != 1:
            raise BlockPoolError("register takes exactly one of tokens=, hashes= or token_blocks=")
        if tokens is not None:
            made = self.token_blocks(tokens, parent=parent)
            if len(made) != len(blocks):
                raise BlockPoolError(
                    f"{len(tokens)} tokens make {len(made)} full blocks of {self.config.model.page_size}, but "
                    f"{len(blocks)} blocks were given; only full blocks are registered"
                )
        elif hashes is not None:
            made = []
            previous = parent.sequence_hash if isinstance(parent, TokenBlock) else parent
            for sequence_hash in hashes:
                made.append(TokenBlock.from_hash(sequence_hash, parent_hash=previous))
                previous = made[-1].sequence_hash
        else:
            made = list(token_blocks or ())
        if not blocks:
            return []
        return blocks[0].pool.register(blocks, made, priority=priority)

    def match(
        self,
        tokens: Sequence[int] | None = None,
        *,
        hashes: Sequence[int] | None = None,
        parent: TokenBlock | int | None = None,
    ) -> PrefixMatch:
        """The longest prefix of ``tokens`` (or of sequence ``hashes``) held across the tiers: G1's blocks, then
        G2's from where G1 stopped, then G3's. The blocks are held until the match is released."""
        from .errors import SequenceHashError

        if (tokens is None) == (hashes is None):
            raise SequenceHashError("match takes tokens or hashes (one of them)")
        page = self.config.model.page_size
        if tokens is not None:
            wanted = [b.sequence_hash for b in self.token_blocks(tokens, parent=parent)]
            requested = len(tokens)
        else:
            wanted = list(hashes or ())
            requested = len(wanted) * page
        return self.offload_manager.match(wanted, requested_tokens=requested, block_size=page)

    def offload(
        self, blocks: Iterable[ImmutableBlock], *, to: Tier | str | None = None, priority: int | None = None
    ) -> BlockFuture[OffloadResult]:
        """Copy registered blocks of one tier to the next tier down (G1 -> G2, or G3 when the CPU cache is bypassed
        or absent; G2 -> G3), or to ``to``. Returns a future (also awaitable) of the :class:`OffloadResult`.

        Per block: skipped when the target holds it, filtered by the tier's ``offload_filter``, skipped and counted
        when the target is full; the rest are queued by ``priority`` (higher first). A block that reaches the host
        tier is then offered to the disk tier. Keep or release your handles as you like: a copy holds its own.
        """
        return self.offload_manager.offload(blocks, to=None if to is None else _tier_key(to), priority=priority)

    def offload_sync(
        self,
        blocks: Iterable[ImmutableBlock],
        *,
        to: Tier | str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
    ) -> OffloadResult:
        """:meth:`offload` and wait for it (raises the TransferError of a failed copy)."""
        return self.offload(blocks, to=to, priority=priority).result(timeout)

    def onboard(
        self, blocks: Iterable[ImmutableBlock], *, to: Tier | str = Tier.G1
    ) -> BlockFuture[list[ImmutableBlock]]:
        """Copy registered blocks of lower tiers into ``to`` (default G1); the future (also awaitable) gives one
        registered block of ``to`` per block, in order. A failed copy registers nothing and raises TransferError."""
        return self.offload_manager.onboard(blocks, to=_tier_key(to))

    def onboard_sync(
        self, blocks: Iterable[ImmutableBlock], *, to: Tier | str = Tier.G1, timeout: float | None = None
    ) -> list[ImmutableBlock]:
        """:meth:`onboard` and wait for it."""
        return self.onboard(blocks, to=to).result(timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no offload is queued or copying (offloads to disk that follow host offloads included)."""
        return self.offload_manager.wait_idle(timeout)

    def stats(self) -> KvbmStats:
        """Blocks per tier by state, offloads skipped by reason, blocks and bytes moved, lookups: plain data."""
        return self.offload_manager.stats()

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with each ``OffloadSkipped``, ``Lookup`` and ``TransferRecord`` as they happen."""
        self.offload_manager.add_listener(listener)

    def __enter__(self) -> KvBlockManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # nothing can be reported from a finalizer
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ", ".join(repr(t) for t in self._tiers.values())
        return f"KvBlockManager(worker_id={self.worker_id}, {state})"


def _close_quietly(storage: object) -> None:
    close = getattr(storage, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


def _note(error: BaseException, text: str) -> None:
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(text)
    else:
        log.error(text)


def _tier_key(tier: Tier | str) -> Tier:
    if isinstance(tier, Tier):
        return tier
    for t in Tier:
        if tier in (t.name, t.slot, t.name.lower()):
            return t
    raise UnknownTierError(
        f"unknown tier {show(tier, typed=False)}; use G1/G2/G3 or device_layout/host_layout/disk_layout"
    )


def _example_allocator(tier: Tier) -> str:
    return {
        Tier.G1: "DeviceAllocator(device_id=0)",
        Tier.G2: "PinnedAllocator() or SystemAllocator()",
        Tier.G3: "DiskAllocator(directory='/tmp/kvbm')",
    }[tier]


class KvBlockManagerBuilder(KvBlockManagerConfigBuilder):
    """``KvBlockManagerConfig.builder()``'s setters; ``build()`` validates, then allocates."""

    def build_config(self) -> KvBlockManagerConfig:
        return super().build()

    def build(self) -> KvBlockManager:  # type: ignore[override]  # same setters, the product is the manager
        return KvBlockManager(self.build_config())
