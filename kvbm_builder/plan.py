"""What a configuration would take, checked against this machine, before anything is allocated.

:func:`plan` lays out every tier (:class:`~kvbm_builder.layout.LayoutSpec`: blocks, bytes, allocations, padding)
and checks it against what :mod:`kvbm_builder.storage.machine` says this machine has (host RAM, ``ulimit -l``, GPU
memory, free disk), and the write-through sizing rule (each tier at least as large as the one above)::

    from kvbm_builder.plan import plan
    report = plan(config)
    report.ok, [row.total_bytes for row in report.tiers], [f.message for f in report.findings]

``kvbm-builder plan`` prints it. Nothing is allocated; the storage modules are imported when a check runs.
"""

from __future__ import annotations

from typing import Any

import attrs

from .config.allocators import DeviceAllocator, DiskAllocator, PinnedAllocator, SystemAllocator
from .config.manager import KvBlockManagerConfig
from .config.protocols import Tier
from .config.sizes import format_bytes

__all__ = ["Finding", "Plan", "TierPlan", "plan"]


@attrs.frozen
class Finding:
    """One check: ``level`` is ``"ok"``, ``"warn"`` or ``"fail"``; ``check`` names what was checked."""

    level: str
    check: str
    message: str


@attrs.frozen
class TierPlan:
    """One tier as it would be laid out."""

    tier: str
    slot: str
    memory: str
    layout: str
    blocks: int
    bytes_per_block: int
    total_bytes: int
    allocations: int
    alignment_overhead_bytes: int


@attrs.frozen
class Plan:
    tiers: tuple[TierPlan, ...]
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings allowed)."""
        return all(f.level != "fail" for f in self.findings)


def plan(config: KvBlockManagerConfig) -> Plan:
    """Lay out ``config``'s tiers and check them against this machine. Every tier of a valid config can be laid out:
    the config refuses one past 2**63 - 1 bytes, alignment padding included."""
    tiers = tuple(_tier_plan(config, tier, layout) for tier, layout in config.tiers())
    return Plan(tiers, tuple(_findings(config, {row.tier: row.total_bytes for row in tiers})))


def _memory(layout: Any) -> str:
    if layout.allocator is not None:
        return str(layout.allocator.storage_kind.value)
    if layout.storage:
        return f"{layout.storage[0].kind.value} (given)"
    return "logical"


def _tier_plan(config: KvBlockManagerConfig, tier: Tier, layout: Any) -> TierPlan:
    from .layout import LayoutSpec

    spec = LayoutSpec.from_config(config.model, layout)  # cannot fail: the config checks the tier's span
    return TierPlan(
        tier=tier.name,
        slot=tier.slot,
        memory=_memory(layout),
        layout=str(layout.layout_type),
        blocks=layout.num_blocks,
        bytes_per_block=spec.block_bytes,
        total_bytes=spec.total_bytes,
        allocations=spec.num_allocations,
        alignment_overhead_bytes=spec.alignment_overhead,
    )


def _check_host(total: int, pinned: bool) -> list[Finding]:
    from .storage import machine

    findings = []
    ram, available = machine.host_memory()
    need = format_bytes(total)
    if ram is None:
        findings.append(Finding("warn", "host RAM", "/proc/meminfo is not readable; cannot check host memory"))
    elif total > ram:
        findings.append(
            Finding("fail", "host RAM", f"the host tier needs {need}; this machine has {format_bytes(ram)}")
        )
    elif available is not None and total > available:
        message = f"the host tier needs {need}; only {format_bytes(available)} is available now"
        findings.append(Finding("warn", "host RAM", message))
    else:
        findings.append(Finding("ok", "host RAM", f"the host tier needs {need} of {format_bytes(ram)}"))
    if pinned:
        limit, words = machine.locked_memory_limit()
        if limit is None:
            findings.append(Finding("ok", "ulimit -l", "locked memory is unlimited"))
        elif limit < total:
            message = (
                f"locked memory is limited to {words}, below the pinned tier's {need}; NIXL/RDMA registration may "
                "fail: raise it (ulimit -l unlimited, or docker --ulimit memlock=-1)"
            )
            findings.append(Finding("warn", "ulimit -l", message))
        else:
            findings.append(Finding("ok", "ulimit -l", f"locked memory limit {words} covers the pinned tier"))
    return findings


def _check_disk(total: int, allocator: DiskAllocator) -> Finding:
    from .storage import machine

    check = f"disk {allocator.directory}"
    free = machine.disk_free(allocator.directory)
    if isinstance(free, str):
        return Finding("fail", check, free)
    if total > free:
        return Finding("fail", check, f"the disk tier needs {format_bytes(total)}; {format_bytes(free)} is free")
    return Finding("ok", check, f"the disk tier needs {format_bytes(total)} of {format_bytes(free)} free")


def _check_device(total: int, allocator: DeviceAllocator) -> Finding:
    from .storage import machine

    check = f"GPU {allocator.device_id}"
    memory = machine.gpu_memory(allocator.device_id)
    if isinstance(memory, str):
        return Finding("warn", check, f"{memory}; cannot check the device tier's {format_bytes(total)}")
    free, whole = memory
    if total > whole:
        return Finding("fail", check, f"the device tier needs {format_bytes(total)}; the GPU has {format_bytes(whole)}")
    if total > free:
        return Finding("warn", check, f"the device tier needs {format_bytes(total)}; {format_bytes(free)} is free now")
    return Finding("ok", check, f"the device tier needs {format_bytes(total)} of {format_bytes(free)} free")


def _findings(config: KvBlockManagerConfig, totals: dict[str, int]) -> list[Finding]:
    findings: list[Finding] = []
    for tier, layout in config.tiers():
        allocator = layout.allocator
        if isinstance(allocator, DeviceAllocator):
            findings.append(_check_device(totals[tier.name], allocator))
        elif isinstance(allocator, (PinnedAllocator, SystemAllocator)):
            findings += _check_host(totals[tier.name], isinstance(allocator, PinnedAllocator))
        elif isinstance(allocator, DiskAllocator):
            findings.append(_check_disk(totals[tier.name], allocator))
    device, host, disk = (getattr(config, t.slot) for t in Tier)
    if device is not None and host is not None and host.num_blocks < device.num_blocks:
        message = (
            f"the host tier holds {host.num_blocks} blocks, fewer than the device tier's {device.num_blocks}: "
            "KVBM writes through, so the host tier churns; make it at least as large as the device tier"
        )
        findings.append(Finding("warn", "tier sizes", message))
    if host is not None and disk is not None and disk.num_blocks < host.num_blocks:
        message = (
            f"the disk tier holds {disk.num_blocks} blocks, fewer than the host tier's {host.num_blocks}: it churns; "
            "make it at least as large as the host tier"
        )
        findings.append(Finding("warn", "tier sizes", message))
    if disk is not None and host is None and device is not None:
        findings.append(Finding("ok", "tier sizes", "no host tier: the device tier offloads straight to disk"))
    return findings
