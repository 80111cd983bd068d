"""Importing the package and building configs is pure: no cupy, no nixl, no GPU, no prometheus until needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (this one may already have imported anything) and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_kvbm_builder_imports_no_gpu_or_nixl_module() -> None:
    out = run_fresh(
        """
        import sys
        import kvbm_builder
        heavy = ("cupy", "nixl", "torch", "numpy")
        print(sorted(name for name in sys.modules if name.split(".")[0] in heavy))
        """
    )

    assert out.strip() == "[]"


def test_building_a_whole_config_with_allocators_imports_no_gpu_or_nixl_module() -> None:
    out = run_fresh(
        """
        import sys
        from kvbm_builder import KvBlockManagerConfig, KvManagerLayoutConfig, KvManagerModelConfig
        from kvbm_builder import KvManagerRuntimeConfig, DeviceAllocator, PinnedAllocator, DiskAllocator

        layout = lambda a: KvManagerLayoutConfig.builder().num_blocks(8).allocator(a).build()
        (
            KvBlockManagerConfig.builder()
            .runtime(KvManagerRuntimeConfig.builder().worker_id(0).build())
            .model(KvManagerModelConfig.builder().num_layers(2).outer_dim(2).page_size(16).inner_dim(64).build())
            .device_layout(layout(DeviceAllocator()))
            .host_layout(layout(PinnedAllocator()))
            .disk_layout(layout(DiskAllocator()))
            .build()
        )
        print(sorted(name for name in sys.modules if name.split(".")[0] in ("cupy", "nixl", "torch")))
        """
    )

    assert out.strip() == "[]"
