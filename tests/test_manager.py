"""KvBlockManager on this machine's CPU: a system-memory host tier and a real disk tier, NIXL included."""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from syscalls import is_mapped

from kvbm_builder import (
    AllocationError,
    BlockParallelismStrategy,
    ConfigError,
    DeviceAllocator,
    DiskAllocator,
    DiskStorageError,
    FullyContiguous,
    GpuUnavailableError,
    KvBlockManager,
    KvBlockManagerConfig,
    KvbmError,
    KvManagerLayoutConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
    LayerSeparate,
    LayoutError,
    PinnedAllocator,
    StorageKind,
    SystemAllocator,
    Tier,
)
from kvbm_builder.config.protocols import Storage
from kvbm_builder.storage import SystemStorage, cuda_available
from kvbm_builder.testing import RecordingAllocator as Recording

MODEL = KvManagerModelConfig.builder().num_layers(3).outer_dim(2).page_size(4).inner_dim(8).build()


@attrs.define
class Failing:
    """An allocator that fails the way a full or broken device does."""

    storage_kind: StorageKind

    def allocate(self, size: int) -> Storage:
        raise OSError(28, "No space left on device")


def runtime(nixl: bool = False) -> KvManagerRuntimeConfig:
    builder = KvManagerRuntimeConfig.builder().worker_id(7)
    return (builder.enable_nixl() if nixl else builder.disable_nixl()).build()


def tier(blocks: int, allocator: Any, layout: Any = None, alignment: int = 1) -> KvManagerLayoutConfig[Any]:
    builder = KvManagerLayoutConfig.builder().num_blocks(blocks).allocator(allocator).alignment(alignment)
    return (builder.layout_type(layout) if layout is not None else builder).build()


def files_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_host_and_disk_tiers_are_allocated_addressed_and_released(tmp_path: Path) -> None:
    config = (
        KvBlockManagerConfig.builder()
        .runtime(runtime())
        .model(MODEL)
        .host_layout(tier(8, SystemAllocator()))
        .disk_layout(tier(16, DiskAllocator(directory=str(tmp_path))))
        .build()
    )
    with KvBlockManager(config) as manager:
        assert manager.device is None
        host, disk = manager.tier("G2"), manager.tier(Tier.G3)
        assert host.kind is StorageKind.SYSTEM and disk.kind is StorageKind.DISK
        assert host.num_blocks == 8 and disk.num_blocks == 16
        assert host.nbytes >= 8 * MODEL.bytes_per_block
        assert len(files_in(tmp_path)) == 1
        region = manager.memory_region("disk_layout", 1, 0, 0)
        assert (region.addr, region.size) == (MODEL.bytes_per_block, MODEL.region_bytes)
    assert manager.closed
    assert files_in(tmp_path) == []
    assert all(s.closed for s in host.storages)


def test_builder_takes_the_config_setters_and_builds_a_manager(tmp_path: Path) -> None:
    manager = KvBlockManager.builder().runtime(runtime()).model(MODEL).host_layout(tier(2, SystemAllocator())).build()
    assert isinstance(manager, KvBlockManager)
    manager.close()
    manager.close()  # idempotent
    assert manager.cancellation_token.is_cancelled()


def test_closing_a_manager_leaves_the_callers_token_alone_but_the_caller_can_cancel_it() -> None:
    config = (
        KvBlockManagerConfig.builder().runtime(runtime()).model(MODEL).host_layout(tier(1, SystemAllocator())).build()
    )
    with KvBlockManager(config) as first:
        pass
    assert first.cancellation_token.is_cancelled()
    assert not config.runtime.cancellation_token.is_cancelled()
    with KvBlockManager(config) as second:  # the same config makes a live manager again
        assert not second.cancellation_token.is_cancelled()
        config.runtime.cancellation_token.cancel()
        assert second.cancellation_token.is_cancelled()


@pytest.mark.parametrize(
    "layout",
    [FullyContiguous(), LayerSeparate(outer_contiguous=True), LayerSeparate(outer_contiguous=False)],
)
@pytest.mark.parametrize("alignment", [1, 256])
def test_host_views_are_the_memory_that_memory_region_names(layout: Any, alignment: int) -> None:
    with (
        KvBlockManager.builder()
        .runtime(runtime())
        .model(MODEL)
        .host_layout(tier(5, SystemAllocator(), layout, alignment))
        .build() as manager
    ):
        host = manager.tier(Tier.G2)
        views = host.views(dtype=np.float16)
        assert len(views) == (1 if isinstance(layout, FullyContiguous) else MODEL.num_layers)
        for block in range(5):
            for layer in range(MODEL.num_layers):
                for outer in range(MODEL.outer_dim):
                    if isinstance(layout, FullyContiguous):
                        piece = views[0][block, layer, outer]
                    elif layout.outer_contiguous:
                        piece = views[layer][outer, block]
                    else:
                        piece = views[layer][block, outer]
                    piece[...] = block * 100 + layer * 10 + outer
                    region = host.memory_region(block, layer, outer)
                    assert piece.ctypes.data == region.addr
                    assert piece.nbytes == region.size
        # every region still holds what was written to it: no two views overlap
        for block in range(5):
            for layer in range(MODEL.num_layers):
                for outer in range(MODEL.outer_dim):
                    region = host.memory_region(block, layer, outer)
                    raw = np.frombuffer(ctypes.string_at(region.addr, region.size), dtype=np.float16)
                    assert (raw == block * 100 + layer * 10 + outer).all()


def test_views_refuse_a_dtype_of_another_width_and_the_disk_tier(tmp_path: Path) -> None:
    with (
        KvBlockManager.builder()
        .runtime(runtime())
        .model(MODEL)
        .host_layout(tier(1, SystemAllocator()))
        .disk_layout(tier(1, DiskAllocator(directory=str(tmp_path))))
        .build() as manager
    ):
        with pytest.raises(LayoutError, match="4 bytes wide but the model's dtype_width_bytes is 2"):
            manager.tier("G2").views(dtype=np.float32)
        with pytest.raises(LayoutError, match=r"disk tier .* is a file"):
            manager.tier("G3").views()
        with pytest.raises(KvbmError, match=r"device tier .* is not configured"):
            manager.tier("G1")


def test_disk_tier_round_trips_a_block_through_plain_file_io_without_nixl(tmp_path: Path) -> None:
    with (
        KvBlockManager.builder()
        .runtime(runtime())
        .model(MODEL)
        .host_layout(tier(2, SystemAllocator()))
        .disk_layout(tier(2, DiskAllocator(directory=str(tmp_path))))
        .build() as manager
    ):
        host_block = manager.tier("G2").views()[0][1]
        host_block[...] = np.arange(host_block.size, dtype=host_block.dtype).reshape(host_block.shape)
        disk = manager.tier("G3")
        offset = disk.memory_region(1, 0, 0).addr
        (file,) = disk.storages
        file.write(offset, host_block)
        back = np.zeros_like(host_block)
        file.read_into(offset, back)
        assert (back == host_block).all()


def test_nixl_registers_every_storage_and_deregisters_before_freeing(tmp_path: Path) -> None:
    pytest.importorskip("nixl")
    with (
        KvBlockManager.builder()
        .runtime(runtime(nixl=True))
        .model(MODEL)
        .host_layout(tier(4, SystemAllocator(), LayerSeparate(outer_contiguous=False)))
        .disk_layout(tier(4, DiskAllocator(directory=str(tmp_path))))
        .build() as manager
    ):
        registry = manager._nixl
        assert registry is not None and manager.nixl_agent is not None
        kinds = [(r.tier, r.mem_type) for r in registry.registrations]
        assert kinds == [(Tier.G2, "DRAM")] * MODEL.num_layers + [(Tier.G3, "FILE")]
    assert registry.closed and registry.registrations == ()
    assert files_in(tmp_path) == []


def test_a_failing_tier_releases_every_tier_before_it_and_leaves_no_file(tmp_path: Path) -> None:
    host = Recording(SystemAllocator())
    config = (
        KvBlockManagerConfig.builder()
        .runtime(runtime())
        .model(MODEL)
        .host_layout(tier(4, host, LayerSeparate(outer_contiguous=True)))
        .disk_layout(tier(4, Failing(StorageKind.DISK)))
        .build()
    )
    with pytest.raises(AllocationError, match=r"disk tier \(G3\)'s allocator .* failed to allocate .* No space left"):
        KvBlockManager(config)
    assert len(host.made) == MODEL.num_layers
    assert all(s.closed for s in host.made)
    assert files_in(tmp_path) == []


def test_a_missing_disk_directory_names_the_path_and_releases_the_host_tier(tmp_path: Path) -> None:
    host = Recording(SystemAllocator())
    missing = tmp_path / "not-here"
    config = (
        KvBlockManagerConfig.builder()
        .runtime(runtime())
        .model(MODEL)
        .host_layout(tier(4, host))
        .disk_layout(tier(4, DiskAllocator(directory=str(missing))))
        .build()
    )
    with pytest.raises(DiskStorageError) as caught:
        KvBlockManager(config)
    assert str(missing) in str(caught.value) and "DYN_KVBM_DISK_CACHE_DIR" in str(caught.value)
    assert host.made and all(s.closed for s in host.made)


def test_nixl_registration_failure_releases_memory_and_earlier_registrations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("nixl")
    from kvbm_builder.nixl import NixlRegistry

    host = Recording(SystemAllocator())
    real_register = NixlRegistry.register
    seen: list[Any] = []

    def register_then_fail_on_disk(self: NixlRegistry, storage: Storage, tier: Tier | None = None) -> Any:
        seen.append(self)
        if storage.kind is StorageKind.DISK:
            from kvbm_builder.errors import NixlError

            raise NixlError("injected: FILE registration refused")
        return real_register(self, storage, tier)

    monkeypatch.setattr(NixlRegistry, "register", register_then_fail_on_disk)
    config = (
        KvBlockManagerConfig.builder()
        .runtime(runtime(nixl=True))
        .model(MODEL)
        .host_layout(tier(4, host))
        .disk_layout(tier(4, DiskAllocator(directory=str(tmp_path))))
        .build()
    )
    with pytest.raises(KvbmError, match="injected"):
        KvBlockManager(config)
    assert seen and seen[0].closed and seen[0].registrations == ()
    assert all(s.closed for s in host.made)
    assert files_in(tmp_path) == []


def test_storage_given_by_the_caller_is_used_but_not_freed() -> None:
    from kvbm_builder.storage import allocate_system

    spec_bytes = 2 * MODEL.bytes_per_block + 63
    with allocate_system(spec_bytes) as mine:
        config = (
            KvBlockManagerConfig.builder()
            .runtime(runtime())
            .model(MODEL)
            .host_layout(KvManagerLayoutConfig.builder().num_blocks(2).alignment(64).storage([mine]).build())
            .build()
        )
        with KvBlockManager(config) as manager:
            assert manager.tier("G2").storages == (mine,)
            assert manager.tier("G2").owned is False
        assert not mine.closed


def test_storage_too_small_for_the_layout_names_the_tier_and_both_sizes() -> None:
    from kvbm_builder.storage import allocate_system

    with allocate_system(MODEL.bytes_per_block) as small:
        config = (
            KvBlockManagerConfig.builder()
            .runtime(runtime())
            .model(MODEL)
            .host_layout(KvManagerLayoutConfig.builder().num_blocks(2).storage([small]).build())
            .build()
        )
        with pytest.raises(LayoutError, match=r"host tier \(G2\).* holds \d+ bytes but the layout needs \d+"):
            KvBlockManager(config)
        assert not small.closed


def test_a_storage_of_the_wrong_kind_is_refused_by_the_config() -> None:
    from kvbm_builder.storage import allocate_system

    with allocate_system(4096) as memory:
        builder = KvBlockManagerConfig.builder().runtime(runtime()).model(MODEL)
        with pytest.raises(KvbmError, match=r"disk_layout.storage\[0\]: system storage cannot back the disk tier"):
            builder.disk_layout(KvManagerLayoutConfig.builder().num_blocks(2).storage([memory]).build()).build()


def test_storage_none_alone_is_refused_before_any_manager_starts() -> None:
    with pytest.raises(ConfigError, match="must provide either `storage` or `allocator` or `logical`"):
        KvManagerLayoutConfig.builder().num_blocks(2).storage(None).build()


def test_a_logical_tier_has_no_local_memory() -> None:
    config = (
        KvBlockManagerConfig.builder()
        .runtime(runtime())
        .model(MODEL)
        .host_layout(
            KvManagerLayoutConfig.builder().num_blocks(2).logical(BlockParallelismStrategy.LeaderWorkerSharded).build()
        )
        .build()
    )
    with KvBlockManager(config) as manager:
        host = manager.tier("G2")
        assert host.storages == () and host.kind is None
        with pytest.raises(LayoutError, match="logical"):
            host.memory_region(0, 0, 0)


@pytest.mark.skipif(cuda_available(), reason="checks the error on machines without a GPU")
def test_without_a_gpu_a_device_tier_is_one_clear_error_and_nothing_is_left(tmp_path: Path) -> None:
    config = (
        KvBlockManagerConfig.builder()
        .runtime(runtime())
        .model(MODEL)
        .device_layout(tier(2, DeviceAllocator()))
        .host_layout(tier(2, PinnedAllocator()))
        .disk_layout(tier(2, DiskAllocator(directory=str(tmp_path))))
        .build()
    )
    with pytest.raises(GpuUnavailableError) as caught:
        KvBlockManager(config)
    message = str(caught.value)
    assert "device tier (G1)" in message
    assert files_in(tmp_path) == []


@pytest.mark.skipif(cuda_available(), reason="checks the error on machines without a GPU")
def test_without_a_gpu_a_pinned_host_tier_points_to_system_memory() -> None:
    config = (
        KvBlockManagerConfig.builder().runtime(runtime()).model(MODEL).host_layout(tier(2, PinnedAllocator())).build()
    )
    with pytest.raises(GpuUnavailableError, match="host tier") as caught:
        KvBlockManager(config)
    assert "system" in str(caught.value).lower()


def test_a_manager_needs_a_config() -> None:
    with pytest.raises(KvbmError, match="needs a KvBlockManagerConfig"):
        KvBlockManager({"model": {}})  # type: ignore[arg-type]


def test_system_storage_is_what_the_host_slot_reports() -> None:
    with KvBlockManager.builder().runtime(runtime()).model(MODEL).host_layout(tier(1, SystemAllocator())).build() as m:
        (storage,) = m.tier("G2").storages
        assert isinstance(storage, SystemStorage)
        assert "G2" in repr(m) and "system" in repr(m)


@attrs.define
class Returns:
    """An allocator of the host tier that hands back whatever it is given."""

    thing: Any
    storage_kind: StorageKind = StorageKind.SYSTEM

    def allocate(self, size: int) -> Any:
        return self.thing


def test_an_allocator_that_returns_no_storage_or_the_wrong_kind_is_named(tmp_path: Path) -> None:
    from kvbm_builder.storage import allocate_disk

    for thing in [None, allocate_disk(8192, DiskAllocator(directory=str(tmp_path)))]:
        config = (
            KvBlockManagerConfig.builder().runtime(runtime()).model(MODEL).host_layout(tier(1, Returns(thing))).build()
        )
        with pytest.raises(AllocationError, match=r"host tier \(G2\)'s allocator .* not a storage of pinned or system"):
            KvBlockManager(config)
    assert files_in(tmp_path) == []  # the disk storage handed to the host slot was released


def test_a_cleanup_failure_does_not_hide_why_the_bring_up_failed(tmp_path: Path) -> None:
    @attrs.define
    class BrokenRelease:
        inner: Any

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def close(self) -> None:
            self.inner.close()
            raise OSError(5, "EIO on release")

    @attrs.define
    class Allocates:
        storage_kind: StorageKind = StorageKind.SYSTEM

        def allocate(self, size: int) -> Any:
            from kvbm_builder.storage import allocate_system

            return BrokenRelease(allocate_system(size))

    config = (
        KvBlockManagerConfig.builder()
        .runtime(runtime())
        .model(MODEL)
        .host_layout(tier(1, Allocates()))
        .disk_layout(tier(1, Failing(StorageKind.DISK)))
        .build()
    )
    with pytest.raises(AllocationError, match="No space left on device") as caught:
        KvBlockManager(config)
    notes = getattr(caught.value, "__notes__", [])
    assert any("EIO on release" in note for note in notes)


def test_an_interrupted_close_can_be_finished_by_calling_it_again(tmp_path: Path) -> None:
    interrupts = [KeyboardInterrupt()]

    @attrs.define
    class InterruptOnce:
        inner: Any

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def close(self) -> None:
            if interrupts:
                raise interrupts.pop()
            self.inner.close()

    @attrs.define
    class Allocates:
        storage_kind: StorageKind = StorageKind.SYSTEM
        made: list[Any] = attrs.field(factory=list)

        def allocate(self, size: int) -> Any:
            from kvbm_builder.storage import allocate_system

            self.made.append(InterruptOnce(allocate_system(size)))
            return self.made[-1]

    host = Allocates()
    manager = (
        KvBlockManager.builder()
        .runtime(runtime())
        .model(MODEL)
        .host_layout(tier(1, host))
        .disk_layout(tier(1, DiskAllocator(directory=str(tmp_path))))
        .build()
    )
    with pytest.raises(KeyboardInterrupt):
        manager.close()
    assert not manager.closed and files_in(tmp_path) == []  # newest first: the disk file went before the interrupt
    manager.close()
    assert manager.closed and host.made[0].inner.closed


def test_views_and_regions_of_a_closed_manager_are_refused() -> None:
    from kvbm_builder.storage import StorageClosedError

    with KvBlockManager.builder().runtime(runtime()).model(MODEL).host_layout(tier(1, SystemAllocator())).build() as m:
        host = m.tier("G2")
        with pytest.raises(LayoutError, match=r"'float17' is not a dtype"):
            host.views(dtype="float17")
    with pytest.raises(StorageClosedError, match="released"):
        host.memory_region(0, 0, 0)
    with pytest.raises(StorageClosedError):
        host.views()


def test_memory_nixl_will_not_let_go_is_kept_until_a_retried_close_succeeds(tmp_path: Path) -> None:
    pytest.importorskip("nixl")
    host = Recording(SystemAllocator())
    manager = (
        KvBlockManager.builder()
        .runtime(runtime(nixl=True))
        .model(MODEL)
        .host_layout(tier(2, host))
        .disk_layout(tier(2, DiskAllocator(directory=str(tmp_path))))
        .build()
    )
    agent = manager.nixl_agent
    real_deregister = agent.deregister_memory

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected: NIXL_ERR_BACKEND")

    agent.deregister_memory = refuse
    with pytest.raises(AllocationError, match=r"kept 2 storage.*call close\(\) again"):
        manager.close()
    assert not manager.closed
    assert not host.made[0].closed and len(files_in(tmp_path)) == 1  # never freed under a live registration
    agent.deregister_memory = real_deregister
    manager.close()
    assert manager.closed and host.made[0].closed and files_in(tmp_path) == []


def test_a_tier_too_large_to_address_is_named_before_anything_is_allocated() -> None:
    huge = KvManagerModelConfig.builder().num_layers(1).outer_dim(1).page_size(2**20).inner_dim(2**20).build()
    host = Recording(SystemAllocator())
    layout = KvManagerLayoutConfig.builder().num_blocks(4).alignment(2**62).allocator(host).build()
    try:
        config = KvBlockManagerConfig.builder().runtime(runtime()).model(huge).host_layout(layout).build()
    except ConfigError as err:  # the config may already refuse it
        assert any(path.startswith("host_layout") for path, _ in err.errors)
    else:
        with pytest.raises(ConfigError) as caught:
            KvBlockManager(config)
        assert all(path.startswith("host_layout") for path, _ in caught.value.errors)
    assert host.made == []


# --- views only in plain numeric dtypes of the model's width ----------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "width"),
    [
        (object, 8),
        ("O", 8),
        ("M8[s]", 8),
        ("m8[ms]", 8),
        (np.dtype([("k", "<u1"), ("v", "<u1")]), 2),
        ("V2", 2),
        ("U1", 4),
        ("S2", 2),
        ("?", 1),
        ("(2,)u1", 2),
    ],
)
def test_views_refuse_every_dtype_that_is_not_a_plain_number(dtype: Any, width: int) -> None:
    model = KvManagerModelConfig.builder().num_layers(1).outer_dim(1).page_size(2).inner_dim(4)
    model = model.dtype_width_bytes(width).build()
    with KvBlockManager.builder().runtime(runtime()).model(model).host_layout(tier(2, SystemAllocator())).build() as m:
        with pytest.raises(LayoutError, match=r"host tier \(G2\): views need a plain numeric dtype") as caught:
            m.tier("G2").views(dtype=dtype)
        assert f"{width} bytes wide" in str(caught.value) and f"uint{8 * width}" in str(caught.value)


@pytest.mark.parametrize("dtype", [np.float16, np.int16, "<u2", ">f2", np.dtype("e")])
def test_views_take_any_numeric_dtype_of_the_models_width(dtype: Any) -> None:
    with KvBlockManager.builder().runtime(runtime()).model(MODEL).host_layout(tier(2, SystemAllocator())).build() as m:
        (view,) = m.tier("G2").views(dtype=dtype)
        view[...] = 3
        assert (view == 3).all() and view.dtype == np.dtype(dtype)


@pytest.mark.parametrize(
    "dtype",
    [("i4", -1), 2**100, 10**5000, "float17", [("a",)], "M8[xyz]", {"names": 1}],
    ids=["negative-shape", "big-int", "5000-digit-int", "float17", "bad-field", "bad-unit", "bad-names"],
)
def test_a_dtype_numpy_cannot_make_is_a_layout_error(dtype: Any) -> None:
    manager = KvBlockManager.builder().runtime(runtime()).model(MODEL).host_layout(tier(2, SystemAllocator())).build()
    with manager, pytest.raises(LayoutError, match=r"host tier \(G2\): .* is not a dtype"):
        manager.tier("G2").views(dtype=dtype)


# --- what could not be released is kept, named, and released by a retry -------------------------------------


def test_a_disk_file_that_cannot_be_removed_keeps_the_manager_open_until_a_retry_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvbm_builder.manager import ReleaseError

    manager = (
        KvBlockManager.builder()
        .runtime(runtime())
        .model(MODEL)
        .host_layout(tier(2, SystemAllocator()))
        .disk_layout(tier(2, DiskAllocator(directory=str(tmp_path))))
        .build()
    )
    (file,) = manager.tier("G3").storages

    def busy(path: str) -> None:
        raise OSError(16, "Device or resource busy", path)

    monkeypatch.setattr(os, "unlink", busy)
    with pytest.raises(ReleaseError, match=r"cannot remove .*call close\(\) again") as caught:
        manager.close()
    assert caught.value.unreleased == (file,) and caught.value.manager is manager
    assert not manager.closed and files_in(tmp_path) != []  # not "closed" while the file stays
    assert manager.tier("G2").storages[0].closed  # what could be released was
    monkeypatch.undo()
    manager.close()  # the retry finishes
    assert manager.closed and files_in(tmp_path) == [] and file.closed


def test_a_failed_bring_up_whose_nixl_rollback_fails_keeps_the_memory_nixl_holds(tmp_path: Path) -> None:
    nixl_api = pytest.importorskip("nixl._api")
    from kvbm_builder import NixlOptions
    from kvbm_builder.manager import ReleaseError
    from kvbm_builder.nixl import NixlRegistry

    agent = nixl_api.nixl_agent(
        "bring-up", nixl_api.nixl_agent_config(enable_prog_thread=False, backends=["UCX", "POSIX"])
    )
    real_register, real_deregister = agent.register_memory, agent.deregister_memory

    def refuse_files(descs: Any, *args: Any, **kwargs: Any) -> Any:
        if descs.getType() == nixl_api.nixlBind.FILE_SEG:
            raise RuntimeError("injected: NIXL_ERR_BACKEND on FILE")
        return real_register(descs, *args, **kwargs)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected: NIXL_ERR_BACKEND on deregister")

    agent.register_memory, agent.deregister_memory = refuse_files, refuse
    host = Recording(SystemAllocator())
    config = (
        KvBlockManagerConfig.builder()
        .runtime(KvManagerRuntimeConfig.builder().worker_id(7).use_nixl_agent(agent).build())
        .model(MODEL)
        .host_layout(tier(2, host))
        .disk_layout(tier(2, DiskAllocator(directory=str(tmp_path))))
        .build()
    )
    with pytest.raises(KvbmError, match="could not register the disk tier") as caught:
        KvBlockManager(config)
    release = caught.value.release_error  # type: ignore[attr-defined]
    assert isinstance(release, ReleaseError)
    assert set(map(id, release.unreleased)) == set(map(id, host.made))  # NIXL still holds the host memory
    assert files_in(tmp_path) == []  # the disk file was never registered: it went
    addrs = [s.addr for s in host.made]
    del caught, release, host, config
    gc.collect()  # the half-built manager is garbage now: memory NIXL holds must stay mapped
    assert all(is_mapped(addr) for addr in addrs)
    [registry] = [r for r in NixlRegistry.unreleased() if r.agent is agent]
    agent.register_memory, agent.deregister_memory = real_register, real_deregister
    registry.close()  # NIXL lets go: now the memory may go too
    assert registry not in NixlRegistry.unreleased()
    gc.collect()
    assert not any(is_mapped(addr) for addr in addrs)
    assert NixlOptions  # imported for the agent option's type


def test_a_relative_disk_directory_is_resolved_when_the_file_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "elsewhere" / "cache").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    manager = (
        KvBlockManager.builder()
        .runtime(runtime())
        .model(MODEL)
        .disk_layout(tier(2, DiskAllocator(directory="cache")))
        .build()
    )
    (file,) = manager.tier("G3").storages
    assert os.path.isabs(file.path) and file.path.startswith(str(tmp_path / "cache"))
    name = os.path.basename(file.path)
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "cache" / name).write_bytes(b"someone else's")  # the same name, relative to here
    manager.close()
    assert files_in(tmp_path / "cache") == []  # our file went
    assert files_in(tmp_path / "elsewhere" / "cache") == [name]  # theirs stayed
