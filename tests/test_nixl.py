"""NIXL registration, for real: UCX registers host (DRAM) memory and POSIX registers files on this CPU
machine, and data moved by NIXL between a host storage and a disk storage proves it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm_builder import ConfigError, DiskAllocator, NixlError, NixlOptions, Tier
from kvbm_builder import nixl as nixl_module
from kvbm_builder.nixl import NixlDeregistrationError, NixlRegistry
from kvbm_builder.storage import DiskStorage, SystemStorage, allocate_disk, allocate_system

nixl_api = pytest.importorskip("nixl._api")


@pytest.fixture(scope="module")
def shared_agent() -> Any:
    """A caller's agent (ENABLED_WITH_AGENT), with UCX and POSIX; one for the module, agents take a while."""
    return nixl_api.nixl_agent(
        "caller", nixl_api.nixl_agent_config(enable_prog_thread=False, backends=["UCX", "POSIX"])
    )


@pytest.fixture
def host() -> Iterator[SystemStorage]:
    with allocate_system(64 * 1024) as storage:
        yield storage


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskStorage]:
    with allocate_disk(1 << 20, DiskAllocator(directory=str(tmp_path))) as storage:
        yield storage


@pytest.fixture
def nixl_logger_level() -> Iterator[None]:
    logger = logging.getLogger("nixl")
    level = logger.level
    yield
    logger.setLevel(level)


def transfer(agent: Any, op: str, host: SystemStorage, disk: DiskStorage, file_offset: int, length: int) -> None:
    """One NIXL POSIX transfer between host memory and the disk file, waited for."""
    local = agent.get_xfer_descs([(host.addr, length, 0)], "DRAM")
    remote = agent.get_xfer_descs([(file_offset, length, disk.fd)], "FILE")
    handle = agent.initialize_xfer(op, local, remote, agent.name, backends=["POSIX"])
    try:
        state = agent.transfer(handle)
        while state == "PROC":
            state = agent.check_xfer_state(handle)
        assert state == "DONE"
    finally:
        handle.release()


def test_disabled_creates_nothing_and_registers_nothing(host: SystemStorage) -> None:
    with NixlRegistry(NixlOptions.DISABLED, 7) as registry:
        assert registry.agent is None and not registry.enabled
        assert registry.register(host) is None
        assert registry.registrations == ()


def test_enabled_creates_an_agent_named_after_the_worker_and_moves_data_to_disk(
    host: SystemStorage, disk: DiskStorage, nixl_logger_level: None
) -> None:
    registry = NixlRegistry(NixlOptions.ENABLED, 7, with_files=True)
    agent = registry.agent
    assert agent.name == "7" and registry.owns_agent
    assert {"UCX", "POSIX"} <= set(registry.backends)

    dram = registry.register(host, Tier.G2)
    file = registry.register(disk)
    assert dram is not None and file is not None
    assert (dram.mem_type, dram.dev_id, dram.tier) == ("DRAM", 0, Tier.G2)
    assert set(dram.backends) == {"UCX", "POSIX"}  # POSIX moves DRAM <-> FILE, so it registers DRAM too
    assert (file.mem_type, file.addr, file.size, file.dev_id) == ("FILE", 0, 1 << 20, disk.fd)
    assert file.backends[0] == "POSIX"  # and GDS_MT where cuFile takes the file
    assert registry.register(host) is dram  # once is enough

    pattern = np.arange(host.size, dtype=np.uint64).view(np.uint8)[: host.size]
    host.as_numpy()[:] = pattern
    transfer(agent, "WRITE", host, disk, 8192, host.size)
    back = np.empty(host.size, dtype=np.uint8)
    disk.read_into(8192, back)
    assert np.array_equal(back, pattern)

    registry.close()
    assert registry.agent is None and registry.registrations == ()
    with pytest.raises(Exception, match="NIXL_ERR_NOT_FOUND"):  # nothing registered any more
        transfer(agent, "WRITE", host, disk, 0, 4096)


def test_nixl_logging_is_quiet_unless_asked(monkeypatch: pytest.MonkeyPatch, nixl_logger_level: None) -> None:
    monkeypatch.delenv("NIXL_LOG_LEVEL", raising=False)
    NixlRegistry(NixlOptions.ENABLED, 8).close()
    assert logging.getLogger("nixl").level == logging.WARNING
    NixlRegistry(NixlOptions.ENABLED, 9, log_level="DEBUG").close()
    assert logging.getLogger("nixl").level == logging.DEBUG


def test_a_callers_agent_is_used_and_left_alive(shared_agent: Any, host: SystemStorage, disk: DiskStorage) -> None:
    with NixlRegistry(NixlOptions.enabled_with_agent(shared_agent), 3) as registry:
        assert registry.agent is shared_agent and not registry.owns_agent
        registry.register_all([host, disk])
        host.as_numpy()[:4096] = 42
        transfer(shared_agent, "WRITE", host, disk, 0, 4096)
    assert registry.agent is None
    # deregistered, yet the caller's agent still works
    descs = shared_agent.register_memory(shared_agent.get_reg_descs([(host.addr, 4096, 0, "")], "DRAM"))
    shared_agent.deregister_memory(descs)
    out = bytearray(4096)
    disk.read_into(0, out)
    assert out == bytes([42]) * 4096


def test_a_failure_on_the_second_storage_deregisters_the_first(
    shared_agent: Any, host: SystemStorage, disk: DiskStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = NixlRegistry(NixlOptions.enabled_with_agent(shared_agent), 3)
    first = registry.register(host)
    assert first is not None
    real = shared_agent.register_memory

    def refuse_files(descs: Any, *args: Any, **kwargs: Any) -> Any:
        if descs.getType() == nixl_api.nixlBind.FILE_SEG:
            raise RuntimeError("NIXL_ERR_BACKEND")
        return real(descs, *args, **kwargs)

    monkeypatch.setattr(shared_agent, "register_memory", refuse_files)
    with pytest.raises(NixlError) as caught:
        registry.register(disk, Tier.G3)
    message = str(caught.value)
    assert "could not register the disk tier (G3) storage (FILE" in message and disk.path in message
    assert "the 1 storage(s) registered before were deregistered" in message
    assert registry.registrations == ()
    assert type(caught.value) is NixlError  # nothing is left registered: no storage must be kept
    with pytest.raises(Exception, match="NIXL_ERR_NOT_FOUND"):  # the host storage is no longer registered
        shared_agent.deregister_memory(first.descs)
    registry.close()


def test_an_agent_without_a_file_backend_is_told_what_to_add(host: SystemStorage, disk: DiskStorage) -> None:
    agent = nixl_api.nixl_agent("ucx-only", nixl_api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    with NixlRegistry(NixlOptions.enabled_with_agent(agent), 1) as registry:
        registry.register(host)
        with pytest.raises(NixlError, match=r"no backend .* handles FILE memory.*create_backend\('POSIX'\)"):
            registry.register(disk)
        assert registry.registrations == ()


def test_an_own_agent_gets_posix_when_a_file_shows_up(disk: DiskStorage, nixl_logger_level: None) -> None:
    with NixlRegistry(NixlOptions.ENABLED, 11) as registry:  # with_files was not said
        registration = registry.register(disk)
        assert registration is not None and registration.backends == ("POSIX",)


def test_closed_storages_and_closed_registries_are_refused(shared_agent: Any) -> None:
    registry = NixlRegistry(NixlOptions.enabled_with_agent(shared_agent), 3)
    gone = allocate_system(4096)
    gone.close()
    with pytest.raises(NixlError, match=r"host tier \(G2\).*the storage is closed"):
        registry.register(gone)
    registry.close()
    registry.close()
    with pytest.raises(NixlError, match="registry is closed"):
        registry.register(gone)


def test_something_that_is_not_an_agent_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be a NIXL agent"):  # by the config, before any registry
        NixlOptions.enabled_with_agent(object())


def test_without_nixl_installed_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nixl._api", None)
    with pytest.raises(NixlError, match=r"pip install 'kvbm-builder\[nixl\]'"):
        NixlRegistry(NixlOptions.ENABLED, 1)


# --- failures and interrupts leave the registry knowing exactly what NIXL holds -------------------------------


def holds(agent: Any, storage: SystemStorage | DiskStorage, backend: str) -> bool:
    """Whether ``backend`` of ``agent`` has ``storage`` registered. Deregisters it when it does: ask at the end."""
    mem_type = storage.kind.nixl_mem_type
    descs = agent.get_reg_descs([(storage.addr, storage.size, storage.device_id, "")], mem_type)
    try:
        agent.deregister_memory(descs, backends=[backend])
    except Exception as exc:
        assert "NIXL_ERR_NOT_FOUND" in str(exc)
        return False
    return True


@pytest.fixture
def posix_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """POSIX treated like GDS_MT (tried after the required backends, dropped where it fails): the optional path
    runs on this CPU machine, where no GDS_MT backend can be created."""
    monkeypatch.setattr(nixl_module, "_OPTIONAL", frozenset({"GDS_MT", "POSIX"}))


@pytest.mark.parametrize("when", ["before the call", "after the agent took it"])
def test_an_interrupt_while_adding_an_optional_backend_keeps_the_registration_known(
    shared_agent: Any, host: SystemStorage, monkeypatch: pytest.MonkeyPatch, posix_optional: None, when: str
) -> None:
    real = shared_agent.register_memory

    def interrupted_on_posix(descs: Any, *args: Any, backends: list[str], **kwargs: Any) -> Any:
        if backends == ["POSIX"]:
            if when != "before the call":
                real(descs, *args, backends=backends, **kwargs)
            raise KeyboardInterrupt
        return real(descs, *args, backends=backends, **kwargs)

    monkeypatch.setattr(shared_agent, "register_memory", interrupted_on_posix)
    registry = NixlRegistry(NixlOptions.enabled_with_agent(shared_agent), 3)
    with pytest.raises(KeyboardInterrupt):
        registry.register(host)
    [known] = registry.registrations  # UCX took it: the registry knows, so close() gives it back
    assert known.storage is host and known.backends == ("UCX",)
    registry.close()
    assert registry.closed and registry.registrations == ()
    assert not holds(shared_agent, host, "UCX") and not holds(shared_agent, host, "POSIX")


def test_an_interrupt_just_after_the_agent_took_the_memory_gives_it_back(
    shared_agent: Any, host: SystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shared_agent.register_memory

    def interrupted_on_return(descs: Any, *args: Any, **kwargs: Any) -> Any:
        real(descs, *args, **kwargs)
        raise KeyboardInterrupt  # as when Ctrl-C arrives during the C call: raised once it returns

    monkeypatch.setattr(shared_agent, "register_memory", interrupted_on_return)
    registry = NixlRegistry(NixlOptions.enabled_with_agent(shared_agent), 3)
    with pytest.raises(KeyboardInterrupt):
        registry.register(host)
    assert registry.registrations == ()
    assert not holds(shared_agent, host, "UCX") and not holds(shared_agent, host, "POSIX")
    registry.close()


@pytest.mark.parametrize("when", ["before the call", "after the agent let go"])
def test_an_interrupted_close_is_finished_by_closing_again(
    shared_agent: Any, host: SystemStorage, disk: DiskStorage, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    registry = NixlRegistry(NixlOptions.enabled_with_agent(shared_agent), 3)
    registry.register_all([host, disk])
    real = shared_agent.deregister_memory
    calls = 0

    def interrupted_once(descs: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            if when != "before the call":
                real(descs, *args, **kwargs)
            raise KeyboardInterrupt
        real(descs, *args, **kwargs)

    monkeypatch.setattr(shared_agent, "deregister_memory", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        registry.close()
    assert not registry.closed and [r.storage for r in registry.registrations] == [host, disk]
    with allocate_system(4096) as extra, pytest.raises(NixlError, match="registry is closed"):
        registry.register(extra)  # closing: nothing new is taken on
    registry.close()
    assert registry.closed and registry.registrations == () and registry.agent is None
    monkeypatch.undo()
    assert not any(holds(shared_agent, s, b) for s in (host, disk) for b in ("UCX", "POSIX"))


def refuse_to_deregister(agent: Any, monkeypatch: pytest.MonkeyPatch, mem_type: int) -> None:
    real = agent.deregister_memory

    def refuse(descs: Any, *args: Any, **kwargs: Any) -> None:
        if descs.getType() == mem_type:
            raise RuntimeError("NIXL_ERR_BACKEND")
        real(descs, *args, **kwargs)

    monkeypatch.setattr(agent, "deregister_memory", refuse)


def test_close_names_the_storages_nixl_still_holds_and_keeps_them_for_another_try(
    shared_agent: Any, host: SystemStorage, disk: DiskStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = NixlRegistry(NixlOptions.enabled_with_agent(shared_agent), 3)
    registry.register_all([host, disk])
    refuse_to_deregister(shared_agent, monkeypatch, nixl_api.nixlBind.FILE_SEG)
    with pytest.raises(NixlDeregistrationError) as caught:
        registry.close()
    err = caught.value
    assert isinstance(err, NixlError)
    assert err.still_registered == (disk,)  # the host storage was deregistered: its memory may be freed
    assert "could not deregister 1 storage(s)" in str(err) and disk.path in str(err)
    assert "must not be freed" in str(err) and "NIXL_ERR_BACKEND" in str(err)
    assert not registry.closed and [r.storage for r in registry.registrations] == [disk]
    assert registry.agent is shared_agent
    monkeypatch.undo()  # the backend recovers: closing again finishes
    registry.close()
    assert registry.closed and registry.registrations == ()
    assert not holds(shared_agent, disk, "POSIX") and not holds(shared_agent, host, "UCX")


def test_a_rollback_that_cannot_deregister_says_so_instead_of_claiming_it_did(
    shared_agent: Any, host: SystemStorage, disk: DiskStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = NixlRegistry(NixlOptions.enabled_with_agent(shared_agent), 3)
    registry.register(host)
    real = shared_agent.register_memory

    def refuse_files(descs: Any, *args: Any, **kwargs: Any) -> Any:
        if descs.getType() == nixl_api.nixlBind.FILE_SEG:
            raise RuntimeError("NIXL_ERR_BACKEND")
        return real(descs, *args, **kwargs)

    monkeypatch.setattr(shared_agent, "register_memory", refuse_files)
    refuse_to_deregister(shared_agent, monkeypatch, nixl_api.nixlBind.DRAM_SEG)
    with pytest.raises(NixlDeregistrationError) as caught:
        registry.register(disk)
    message = str(caught.value)
    assert "could not register the disk tier (G3) storage" in message
    assert "of the 1 storage(s) registered before, 1 could not be deregistered and stay registered" in message
    assert "were deregistered" not in message and f"0x{host.addr:x}" in message
    assert caught.value.still_registered == (host,)
    assert [r.storage for r in registry.registrations] == [host]
    monkeypatch.undo()
    registry.close()
    assert registry.registrations == () and not holds(shared_agent, host, "UCX")


def test_only_storages_are_registered_and_only_for_their_own_tier(shared_agent: Any, disk: DiskStorage) -> None:
    with NixlRegistry(NixlOptions.enabled_with_agent(shared_agent), 3) as registry:
        with pytest.raises(NixlError, match=r"cannot register <object .*not a storage \(it needs kind"):
            registry.register(object())  # type: ignore[arg-type]
        with pytest.raises(NixlError, match=r"as <Tier.G2.*a disk storage belongs to the disk tier \(G3\)"):
            registry.register(disk, Tier.G2)
        assert registry.registrations == ()
