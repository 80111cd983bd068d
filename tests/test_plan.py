"""kvbm_builder.plan: what a configuration would take on this machine, as data (the CLI prints it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvbm_builder import ConfigError, KvBlockManagerConfig, KvManagerLayoutConfig, KvManagerModelConfig
from kvbm_builder.config import DiskAllocator, KvManagerRuntimeConfig, SystemAllocator
from kvbm_builder.plan import Finding, plan

MODEL = KvManagerModelConfig.builder().num_layers(4).outer_dim(2).page_size(16).inner_dim(4096).build()  # 1 MiB


def config(tmp_path: Path, host_blocks: int = 64, directory: str | None = None) -> KvBlockManagerConfig:
    disk = DiskAllocator(directory=directory or str(tmp_path))
    return (
        KvBlockManagerConfig.builder()
        .runtime(KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build())
        .model(MODEL)
        .host_layout(KvManagerLayoutConfig.builder().num_blocks(host_blocks).allocator(SystemAllocator()).build())
        .disk_layout(KvManagerLayoutConfig.builder().num_blocks(128).allocator(disk).build())
        .build()
    )


def test_a_plan_lays_out_every_tier_and_checks_this_machine(tmp_path: Path) -> None:
    report = plan(config(tmp_path))
    host, disk = report.tiers
    assert (host.tier, host.memory, host.blocks, host.total_bytes, host.allocations) == ("G2", "system", 64, 2**26, 1)
    assert (disk.tier, disk.memory, disk.total_bytes) == ("G3", "disk", 2**27)
    assert report.ok
    assert [f.check for f in report.findings] == ["host RAM", f"disk {tmp_path}"]


def test_a_missing_directory_fails_the_plan(tmp_path: Path) -> None:
    report = plan(config(tmp_path, directory=str(tmp_path / "absent")))
    assert not report.ok
    assert (
        Finding(
            "fail",
            f"disk {tmp_path / 'absent'}",
            "the directory does not exist; create it or point DYN_KVBM_DISK_CACHE_DIR elsewhere",
        )
        in report.findings
    )


def test_write_through_sizes_are_checked(tmp_path: Path) -> None:
    report = plan(config(tmp_path, host_blocks=256))
    [sizes] = [f for f in report.findings if f.check == "tier sizes"]
    assert sizes.level == "warn" and "fewer than the host tier's 256" in sizes.message


def test_a_tier_that_cannot_be_laid_out_padding_included_is_refused_when_built(tmp_path: Path) -> None:
    # 1 MiB blocks fit 2**63 - 1 bytes, but not once each is padded to 2 MiB: refused where it is built, so that a
    # configuration that validates is one plan (and the manager) can lay out
    host = KvManagerLayoutConfig.builder().num_blocks((2**63 - 1) // 2**20).alignment(2**21)
    too_big = KvBlockManagerConfig.builder().runtime(config(tmp_path).runtime).model(MODEL)
    with pytest.raises(ConfigError, match=r"^host_layout\.num_blocks: .* bytes with their alignment padding, more"):
        too_big.host_layout(host.allocator(SystemAllocator()).build()).build()


def test_the_cli_imports_no_private_module_of_another_package() -> None:
    source = Path(__file__).parent.parent / "kvbm_builder" / "cli.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            assert not any(part.startswith("_") for part in (node.module or "").split(".")), node.module
            assert not any(alias.name.startswith("_") for alias in node.names), node.module
