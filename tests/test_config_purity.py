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


def test_config_is_data_it_imports_nothing_above_it() -> None:
    # config -> layout -> storage -> manager: importing the configuration (and building one, above) never imports
    # a layer above it, so no import cycle can run through config
    out = run_fresh(
        """
        import sys
        import kvbm_builder.config
        above = ("kvbm_builder.storage", "kvbm_builder.layout", "kvbm_builder.loading", "kvbm_builder.manager",
                 "kvbm_builder.nixl", "kvbm_builder.cli", "kvbm_builder.plan")
        print(sorted(name for name in sys.modules if name.startswith(above)))
        """
    )

    assert out.strip() == "[]"


def test_no_module_of_config_names_a_layer_above_it_even_inside_a_function() -> None:
    # a lazy import inside a function is a cycle too: read the sources, not sys.modules
    import ast
    from pathlib import Path

    import kvbm_builder.config

    above = {"storage", "layout", "loading", "manager", "nixl", "cli", "plan", "testing"}
    for path in Path(kvbm_builder.config.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:  # from ..x import y
                assert (node.module or "").split(".")[0] not in above, (path.name, node.module)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    assert not any(name.startswith(f"kvbm_builder.{layer}") for layer in above), (path.name, name)
