"""``kvbm-builder`` (run as ``python -m kvbm_builder``): validate, plan, show, schema; exit codes 0, 1 and 2."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from kvbm_builder.loading import dump, load_file, to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE = Path(__file__).parent.parent / "examples" / "config.toml"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}


def run(
    *args: str | Path, env: dict[str, str] | None = None, memlock: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``kvbm-builder ARGS``; ``memlock``: run it under ``ulimit -l`` of that many bytes (the soft limit)."""

    def lower_memlock(soft: int) -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]))

    return subprocess.run(
        [sys.executable, "-m", "kvbm_builder", *map(str, args)],
        capture_output=True,
        text=True,
        env={**CLEAN_ENV, **(env or {})},
        check=False,
        timeout=120,
        preexec_fn=None if memlock is None else partial(lower_memlock, memlock),
    )


def write(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document) if path.suffix == ".json" else to_toml(document))
    return path


def small(tmp_path: Path, **tables: Any) -> Path:
    """A config this machine can hold: 1 MiB blocks, a small system-memory host tier, a disk tier in tmp_path."""
    document: dict[str, Any] = {
        "runtime": {"worker_id": 0, "nixl": "disabled"},
        "model": {"num_layers": 4, "outer_dim": 2, "page_size": 16, "inner_dim": 4096, "dtype_width_bytes": 2},
        "host_layout": {"size": "64MiB", "allocator": {"kind": "system"}},
        "disk_layout": {"size": "128MiB", "allocator": {"kind": "disk", "directory": str(tmp_path)}},
    }
    document.update(tables)
    return write(tmp_path / "small.toml", document)


def test_help_documents_the_commands_and_exit_codes() -> None:
    result = run("--help")
    assert result.returncode == 0
    for word in ("validate", "plan", "show", "schema", "exit status:", "0  valid", "1  an invalid", "2  a usage error"):
        assert word in result.stdout
    assert "DYN_KVBM_* variables < --set arguments" in run("plan", "--help").stdout


def test_usage_errors_exit_2() -> None:
    assert run().returncode == 2
    assert run("frobnicate").returncode == 2
    result = run("show", EXAMPLE, "--set", "no-equals-sign")
    assert result.returncode == 2 and "--set takes KEY=VALUE" in result.stderr


# ---- validate -------------------------------------------------------------------------------------------------------


def test_validate_a_valid_file() -> None:
    result = run("validate", EXAMPLE)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{EXAMPLE}: ok\n", "")


def test_validate_prints_every_problem_with_its_path_on_stderr(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "bad.toml",
        {
            "runtime": {"worker_id": -1},
            "model": {"num_layers": 0, "outer_dim": 2, "page_size": 16, "inner_dim": 128, "dtype_width_byte": 2},
            "host_layout": {"size": "16 gigs", "allocator": {"kind": "pinned"}},
        },
    )
    result = run("validate", bad)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{bad}: $.runtime.worker_id: must be >= 0, got -1",
        f"{bad}: $.model.dtype_width_byte: unknown key; did you mean `dtype_width_bytes`?",
        f"{bad}: $.model.num_layers: must be >= 1, got 0",
        f"{bad}: $.host_layout.size: '16 gigs' is not a size; write e.g. '16GiB' (2^30 bytes) or '16GB' (10^9 bytes)",
    ]


def test_validate_several_files_reports_each_and_the_worst_status(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.json", {"runtime": {"worker_id": 0}})
    assert run("validate", EXAMPLE, bad).returncode == 1
    result = run("validate", EXAMPLE, bad, tmp_path / "absent.yaml")
    assert result.returncode == 2
    assert f"{EXAMPLE}: ok" in result.stdout
    assert f"{bad}: $.model: must be initialized" in result.stderr
    assert f"{tmp_path / 'absent.yaml'}: no such file" in result.stderr


def test_an_unreadable_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "c.ini").write_text("[runtime]\n")
    result = run("validate", tmp_path / "c.ini")
    assert result.returncode == 2
    assert (
        result.stderr
        == f"{tmp_path / 'c.ini'}: cannot tell the format from the suffix '.ini'; name it .json, .toml or .yaml\n"
    )


def test_the_environment_is_applied_unless_no_env() -> None:
    result = run("validate", EXAMPLE, env={"DYN_KVBM_CPU_CACHE_GB": "lots"})
    assert result.returncode == 1
    assert "$env.DYN_KVBM_CPU_CACHE_GB: must be a non-negative number, such as 4 or 0.5, got 'lots'" in result.stderr
    assert run("validate", EXAMPLE, "--no-env", env={"DYN_KVBM_CPU_CACHE_GB": "lots"}).returncode == 0


# ---- plan -----------------------------------------------------------------------------------------------------------


def test_plan_prints_a_table_per_tier_and_the_checks(tmp_path: Path) -> None:
    result = run("plan", small(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header, host, disk = lines[1:4]
    assert header.split() == ["tier", "layout", "blocks", "block", "total", "allocs", "padding"]
    assert host.split() == [
        "G2",
        "system",
        "FullyContiguous",
        "64",
        "1.0",
        "MiB",
        "64.0",
        "MiB",
        "1",
        "0",
        "bytes",
    ]
    assert disk.split()[:4] == ["G3", "disk", "FullyContiguous", "128"]
    assert len(header) == len(host) == len(disk)  # right-aligned numbers end in the same column
    assert any(line.split()[:3] == ["OK", "host", "RAM"] for line in lines)
    assert any(line.split()[:2] == ["OK", "disk"] for line in lines)
    assert result.stdout.rstrip().endswith(
        "max_concurrent_transfers=4, max_transfer_batch_size=16, disk_offload_filter=True, "
        "cache_stats_max_requests=1000"
    )


def test_plan_as_json(tmp_path: Path) -> None:
    result = run("plan", small(tmp_path), "--format", "json", env={"DYN_KVBM_METRICS": "1"})
    plan = json.loads(result.stdout)
    assert result.returncode == 0 and plan["ok"] is True
    assert [row["tier"] for row in plan["tiers"]] == ["G2", "G3"]
    assert plan["tiers"][0] == {
        "tier": "G2",
        "slot": "host_layout",
        "memory": "system",
        "layout": "FullyContiguous",
        "blocks": 64,
        "bytes_per_block": 2**20,
        "total_bytes": 64 * 2**20,
        "allocations": 1,
        "alignment_overhead_bytes": 0,
    }
    assert {check["level"] for check in plan["checks"]} == {"ok"}
    assert plan["settings"]["metrics"] is True


def test_plan_counts_alignment_padding_and_allocations(tmp_path: Path) -> None:
    table = {
        "num_blocks": 10,
        "layout_type": "layer_separate_block_contiguous",
        "alignment": 2**21,
        "allocator": {"kind": "system"},
    }
    plan = json.loads(run("plan", small(tmp_path, host_layout=table), "--format", "json").stdout)
    host = plan["tiers"][0]
    assert host["allocations"] == 4  # one per layer
    assert host["bytes_per_block"] == 4 * 2**21  # each layer's 512 KiB part of a block padded to 2 MiB
    assert host["alignment_overhead_bytes"] == host["total_bytes"] - 10 * 2**20


def test_the_example_plans_where_the_readme_says_to_run_it() -> None:
    # it used to name /tmp/kvbm, which a fresh machine does not have: plan failed on the README's second command
    plan = json.loads(run("plan", EXAMPLE, "--format", "json").stdout)
    [disk] = [check for check in plan["checks"] if check["check"].startswith("disk ")]
    assert disk["check"] == "disk /tmp" and "does not exist" not in disk["message"]


def test_a_check_that_fails_exits_1_and_a_missing_directory_is_a_finding(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    path = small(tmp_path, disk_layout={"num_blocks": 1, "allocator": {"kind": "disk", "directory": str(missing)}})
    result = run("plan", path)
    assert result.returncode == 1
    assert f"FAIL  disk {missing}" in result.stdout
    assert "the directory does not exist; create it or point DYN_KVBM_DISK_CACHE_DIR elsewhere" in result.stdout


def test_a_host_tier_larger_than_this_machine_fails(tmp_path: Path) -> None:
    plan = json.loads(
        run("plan", small(tmp_path, host_layout={"size": "4096TiB", "allocator": {}}), "--format", "json").stdout
    )
    assert plan["ok"] is False
    [ram] = [check for check in plan["checks"] if check["check"] == "host RAM"]
    assert ram["level"] == "fail" and "this machine has" in ram["message"]
    assert any(check["check"] == "ulimit -l" for check in plan["checks"])


def test_plan_warns_when_a_lower_tier_is_smaller_than_the_one_above(tmp_path: Path) -> None:
    path = small(
        tmp_path,
        device_layout={"num_blocks": 128, "allocator": {}},
        disk_layout={"size": "32MiB", "allocator": {"directory": str(tmp_path)}},
    )
    plan = json.loads(run("plan", path, "--format", "json").stdout)
    sizes = [check["message"] for check in plan["checks"] if check["check"] == "tier sizes"]
    assert sizes == [
        "the host tier holds 64 blocks, fewer than the device tier's 128: KVBM writes through, so the host tier "
        "churns; make it at least as large as the device tier",
        "the disk tier holds 32 blocks, fewer than the host tier's 64: it churns; make it at least as large as the "
        "host tier",
    ]


def test_plan_without_a_gpu_says_why_and_does_not_fail(tmp_path: Path) -> None:
    from kvbm_builder.storage import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is visible here: test_plan_checks_gpu_memory checks it")
    plan = json.loads(
        run("plan", small(tmp_path, device_layout={"num_blocks": 8, "allocator": {}}), "--format", "json").stdout
    )
    [gpu] = [check for check in plan["checks"] if check["check"] == "GPU 0"]
    assert gpu == {
        "level": "warn",
        "check": "GPU 0",
        "message": f"no GPU visible: {reason}; cannot check the device tier's 8.0 MiB",
    }
    assert plan["ok"] is True


def ulimit_l_check(path: Path, memlock: int) -> dict[str, str]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if hard != resource.RLIM_INFINITY and hard < memlock:
        pytest.skip(f"the hard memlock limit here ({hard} bytes) is below {memlock}")
    result = run("plan", path, "--format", "json", memlock=memlock)
    [check] = [check for check in json.loads(result.stdout)["checks"] if check["check"] == "ulimit -l"]
    return dict(check)


def test_plan_warns_when_ulimit_l_is_below_the_pinned_tier(tmp_path: Path) -> None:
    pinned = small(tmp_path, host_layout={"size": "4MiB", "allocator": {"kind": "pinned"}})
    assert ulimit_l_check(pinned, 2**20) == {
        "level": "warn",
        "check": "ulimit -l",
        "message": "locked memory is limited to 1.0 MiB (ulimit -l 1024), below the pinned tier's 4.0 MiB; NIXL/RDMA "
        "registration may fail: raise it (ulimit -l unlimited, or docker --ulimit memlock=-1)",
    }
    assert ulimit_l_check(pinned, 8 * 2**20) == {
        "level": "ok",
        "check": "ulimit -l",
        "message": "locked memory limit 8.0 MiB (ulimit -l 8192) covers the pinned tier",
    }


def test_importing_the_cli_imports_no_gpu_library_and_no_storage() -> None:
    code = (
        "import sys, kvbm_builder.cli; "
        "print(sorted(m for m in ('cupy', 'nixl', 'torch', 'numpy', 'kvbm_builder.storage') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout == "[]\n"


@pytest.mark.gpu
def test_plan_checks_gpu_memory(tmp_path: Path) -> None:
    fits = small(tmp_path, device_layout={"num_blocks": 8, "allocator": {}})
    [gpu] = [c for c in json.loads(run("plan", fits, "--format", "json").stdout)["checks"] if c["check"] == "GPU 0"]
    assert gpu["level"] == "ok" and "free" in gpu["message"]
    huge = small(tmp_path, device_layout={"size": "1024TiB", "allocator": {}})
    [gpu] = [c for c in json.loads(run("plan", huge, "--format", "json").stdout)["checks"] if c["check"] == "GPU 0"]
    assert gpu["level"] == "fail" and "the GPU has" in gpu["message"]
    absent = small(tmp_path, device_layout={"num_blocks": 8, "allocator": {"device_id": 1000}})
    [gpu] = [
        c for c in json.loads(run("plan", absent, "--format", "json").stdout)["checks"] if c["check"] == "GPU 1000"
    ]
    assert gpu["level"] == "warn" and gpu["message"].startswith("GPU 1000 is not visible")


# ---- show, schema ---------------------------------------------------------------------------------------------------


def test_show_prints_the_resolved_config_as_json_or_toml() -> None:
    expected = dump(load_file(EXAMPLE))
    shown = run("show", EXAMPLE)
    assert shown.returncode == 0 and json.loads(shown.stdout) == expected
    assert tomllib.loads(run("show", EXAMPLE, "--format", "toml").stdout) == expected


def test_show_sources_says_where_each_value_came_from() -> None:
    result = run("show", EXAMPLE, "--sources", "--set", "model.page_size=16", env={"DYN_KVBM_DISK_CACHE_DIR": "/data"})
    shown = json.loads(result.stdout)
    assert shown["config"]["disk_layout"]["allocator"]["directory"] == "/data"
    assert shown["sources"]["disk_layout.allocator.directory"] == "env DYN_KVBM_DISK_CACHE_DIR"
    assert shown["sources"]["model.page_size"] == "argument"
    assert shown["sources"]["host_layout.num_blocks"] == "file, from size = '16GiB'"
    assert shown["sources"]["device_layout.alignment"] == "default"
    toml = run("show", EXAMPLE, "--sources", "--format", "toml").stdout
    assert 'directory = "/tmp"  # file\n' in toml


def test_set_values_are_json_when_they_parse_as_json(tmp_path: Path) -> None:
    result = run(
        "show", EXAMPLE, "--set", "disk_layout=null", "--set", "host_layout.size=8GiB", "--set", "runtime.worker_id=7"
    )
    shown = json.loads(result.stdout)
    assert "disk_layout" not in shown
    assert shown["runtime"]["worker_id"] == 7
    assert shown["host_layout"]["num_blocks"] == 2048


def test_schema_prints_a_json_schema() -> None:
    result = run("schema")
    schema = json.loads(result.stdout)
    assert result.returncode == 0
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "KvBlockManagerConfig" in schema["$defs"]


# ---- review 2 ---------------------------------------------------------------------------------------------------

TINY = {"runtime": {"worker_id": 0}, "model": {"num_layers": 2, "outer_dim": 2, "page_size": 4, "inner_dim": 8}}


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """``kvbm-builder ARGS`` in this process, with no DYN_KVBM_* variables: (status, stdout, stderr)."""
    from kvbm_builder.cli import main

    try:
        status = main([*map(str, args), "--no-env"])
    except SystemExit as exit:  # argparse's usage errors
        status = int(exit.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_validate_names_a_tier_whose_block_is_too_large(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "c.json", {**TINY, "host_layout": {"size": "1GiB", "alignment": 2**63}})
    status, _, err = cli(capsys, "validate", path)
    assert status == 1 and f"{path}: $.host_layout.size: one block of this layout is too large" in err


def test_validate_refuses_a_tier_too_large_for_its_padding_as_plan_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 256-byte blocks: the count fits in 2**63 - 1 bytes, but not once each block is padded to 2 MiB
    host = {"num_blocks": (2**63 - 1) // 256, "alignment": 2**21, "allocator": {"kind": "system"}}
    path = write(tmp_path / "c.json", {**TINY, "host_layout": host})
    for command in ("validate", "plan"):
        status, out, err = cli(capsys, command, path)
        assert (status, out) == (1, "")
        assert err.startswith(f"{path}: $.host_layout.num_blocks: 36028797018963967 blocks of 256 bytes need ")
        assert "bytes with their alignment padding, more than the 9223372036854775807 bytes" in err
        assert "lower num_blocks to at most 4398046511103," in err


def test_a_tier_whose_only_choice_is_null_is_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # it used to validate, then fail in `show --format toml` (TOML has no null) and when a manager started
    path = write(tmp_path / "c.json", {**TINY, "host_layout": {"num_blocks": 4, "logical": None}})
    status, _, err = cli(capsys, "validate", path)
    assert status == 1 and f"{path}: $.host_layout: must provide either `storage` or `allocator` or `logical`" in err


def test_a_set_value_nested_too_deeply_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "c.json", TINY)
    status, _, err = cli(capsys, "validate", path, "--set", "model=" + "[" * 100_000)
    assert status == 2 and "--set model: the value is nested too deeply" in err
