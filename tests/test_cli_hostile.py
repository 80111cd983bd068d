"""The command line under hostile use: ``--set`` arguments that files would refuse or that point nowhere, names and
values its output's encoding cannot hold, a reader that goes away, Ctrl-C. Always a clear message and a documented
exit status, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvbm_builder import cli

TINY: dict[str, Any] = {
    "runtime": {"worker_id": 0},
    "model": {"num_layers": 2, "outer_dim": 2, "page_size": 4, "inner_dim": 8},
    "host_layout": {"num_blocks": 4, "allocator": {"kind": "system"}},
}
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}


def in_process(*args: str | bytes | Path, encoding: str = "utf-8") -> tuple[int, str, str]:
    """``kvbm-builder ARGS --no-env`` in this process, its output written to streams of ``encoding`` that refuse
    what they cannot encode (as a terminal's stdout does): (status, stdout, stderr) as text."""
    out = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="strict", write_through=True)
    argv = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main([*argv, "--no-env"])
        except SystemExit as exit:  # argparse's usage errors
            status = int(exit.code or 0)
    texts = [stream.buffer.getvalue().decode(encoding) for stream in (out, err)]  # type: ignore[attr-defined]
    return status, texts[0], texts[1]


def subprocess_run(
    *args: str | bytes | Path, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kvbm_builder", *args],
        capture_output=True,
        env={**CLEAN_ENV, **(env or {})},
        check=False,
        timeout=120,
        **kwargs,
    )


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


# ---- --set: nothing dropped silently, JSON as files read it ------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "inside", "value"),
    [
        ("model.num_layers.x=5", "model.num_layers", "2"),
        ("host_layout.num_blocks.extra.deep=1", "host_layout.num_blocks", "4"),
        ("host_layout.allocator.kind.name=system", "host_layout.allocator.kind", "'system' (str)"),
        ("runtime.worker_id.x=null", "runtime.worker_id", "0"),
    ],
)
def test_a_set_inside_a_value_that_is_not_a_table_is_a_problem_not_dropped(
    tiny: Path, setting: str, inside: str, value: str
) -> None:
    status, out, err = in_process("validate", tiny, "--set", setting)
    key = setting.partition("=")[0]
    assert (status, out) == (1, "")
    assert err == f"{tiny}: $arg.{key}: cannot set a value inside {inside}: it is {value}, not a table\n"


def test_removing_what_is_not_there_makes_no_table_on_the_way(tiny: Path) -> None:
    # `disk_layout.size=null` used to create an empty disk_layout, then refuse it for lacking num_blocks
    assert in_process("validate", tiny, "--set", "disk_layout.size=null", "--set", "consolidator_config.x=null") == (
        0,
        f"{tiny}: ok\n",
        "",
    )


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ('{"num_layers": 2, "num_layers": 3}', "duplicate key 'num_layers'"),
        ("NaN", "NaN is not a number JSON allows"),
        ("[1, -Infinity]", "-Infinity is not a number JSON allows"),
        ("9" * 5000, "Exceeds the limit (4300 digits) for integer string conversion"),
    ],
)
def test_set_values_are_json_as_files_read_it(tiny: Path, value: str, why: str) -> None:
    # files refuse these; --set used to take a duplicate key (the last won), NaN as a float, and 5000 digits as text
    status, out, err = in_process("validate", tiny, "--set", f"model={value}")
    assert (status, out) == (2, "")
    assert err.splitlines()[-1].startswith("kvbm-builder: error: --set model: the value is JSON that a file may ")
    assert why in err


def test_a_set_value_that_is_no_json_is_text(tiny: Path) -> None:
    status, _, err = in_process("validate", tiny, "--set", "model.num_layers={oops")
    assert status == 1 and "$.model.num_layers: must be an integer, got '{oops' (str)" in err


# ---- output its encoding cannot hold --------------------------------------------------------------------------------


def test_non_ascii_names_and_values_print_escaped_where_the_output_is_ascii(tmp_path: Path) -> None:
    path = tmp_path / "café.json"
    directory = tmp_path / "überall"
    directory.mkdir()
    path.write_text(json.dumps({**TINY, "disk_layout": {"num_blocks": 8, "allocator": {"kind": "disk"}}}))
    where = f"--set=disk_layout.allocator.directory={directory}"
    escaped_path = str(path).replace("é", "\\xe9")
    escaped_dir = str(directory).replace("ü", "\\xfc")
    assert in_process("validate", path, encoding="ascii") == (0, f"{escaped_path}: ok\n", "")
    status, out, _ = in_process("show", path, where, "--format", "toml", "--sources", encoding="ascii")
    assert status == 0 and f'directory = "{escaped_dir}"  # argument' in out
    status, out, _ = in_process("plan", path, where, encoding="ascii")
    assert status == 0 and f"disk {escaped_dir}" in out
    status, _, err = in_process("validate", path, "--set", "model.num_layers=ü", encoding="ascii")
    assert status == 1 and err == f"{escaped_path}: $.model.num_layers: must be an integer, got '\\xfc' (str)\n"


def test_a_file_name_that_is_not_utf8_prints_escaped(tmp_path: Path) -> None:
    name = os.fsencode(tmp_path) + b"/\xff.json"
    Path(os.fsdecode(name)).write_text(json.dumps(TINY))
    shown = f"{tmp_path}/\\udcff.json"
    assert in_process("validate", name) == (0, f"{shown}: ok\n", "")
    assert in_process("validate", name + b"x") == (
        2,
        "",
        f"{shown}x: cannot tell the format from the suffix '.jsonx'; name it .json, .toml or .yaml\n",
    )


@pytest.mark.parametrize(
    "env",
    [{"PYTHONIOENCODING": "utf-8"}, {"PYTHONIOENCODING": "ascii"}, {"PYTHONIOENCODING": "ascii:strict", "LC_ALL": "C"}],
    ids=["utf-8-strict", "ascii", "C-locale-ascii-strict"],
)
def test_the_real_command_prints_what_its_encoding_cannot_hold_escaped(tmp_path: Path, env: dict[str, str]) -> None:
    name = os.fsencode(tmp_path) + "/\xe9\udcff.json".encode("utf-8", "surrogateescape")
    Path(os.fsdecode(name)).write_text(json.dumps(TINY))
    for args in (
        [b"validate", name],
        [b"show", name, b"--format", b"toml", b"--sources"],
        [b"plan", name],
        [b"validate", name, b"--set", "model.num_layers=\xe9".encode()],
        [b"validate", name + b".absent.json"],
        [b"frobnicate", "\xe9".encode()],
    ):
        done = subprocess_run(*args, env=env)
        assert b"Traceback" not in done.stderr and b"Error:" not in done.stderr, (args, done.stderr)
        assert done.returncode in (0, 1, 2)
        assert done.stdout or done.stderr


def test_a_path_component_past_255_bytes_is_a_clear_message(tmp_path: Path, tiny: Path) -> None:
    long = tmp_path / ("a" * 300 + ".json")
    assert in_process("validate", long) == (2, "", f"{long}: cannot be read: File name too long\n")
    deep = f"--set=disk_layout={json.dumps({'num_blocks': 1, 'allocator': {'kind': 'disk', 'directory': str(long)}})}"
    status, out, err = in_process("plan", tiny, deep)
    assert (status, err) == (1, "") and f"FAIL  disk {long}" in out


# ---- a reader that goes away, Ctrl-C ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["schema"], ["--help"], ["show", "TINY"], ["plan", "TINY"], ["validate", "TINY"]])
def test_a_reader_that_went_away_ends_it_quietly_with_141(tiny: Path, command: list[str]) -> None:
    read, write = os.pipe()
    os.close(read)  # no reader from the start: the first write fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "kvbm_builder", *[str(tiny) if a == "TINY" else a for a in command]],
            stdout=write,
            stderr=subprocess.PIPE,
            env=CLEAN_ENV,
            check=False,
            timeout=120,
        )
    finally:
        os.close(write)
    # argparse's own printing (--help) swallows the error and exits 0: quiet all the same
    assert (done.returncode, done.stderr) == (0 if command == ["--help"] else 141, b"")


def test_ctrl_c_ends_it_with_130_and_one_line(tmp_path: Path) -> None:
    files = []
    for i in range(4000):  # seconds of work: the interrupt lands while main() runs
        path = tmp_path / f"c{i}.json"
        path.write_text(json.dumps(TINY))
        files.append(str(path))
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "kvbm_builder", "validate", "--no-env", *files],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=CLEAN_ENV,
    )
    assert process.stdout is not None and process.stdout.readline().endswith(b": ok\n")  # main() is running
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert (process.returncode, err) == (130, b"kvbm-builder: interrupted\n")


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs POSIX signal masks")
def test_ctrl_c_cannot_land_between_the_check_and_the_switch_to_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the process fuzz family (1 run in 2,400): a Ctrl-C inside signal.signal(), after its check for pending
    signals, printed "OSError: Signal 2 ignored due to race condition". While it switches, SIGINT is blocked."""
    seen: list[tuple[object, set[signal.Signals]]] = []
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())

    def switch(signum: int, handler: Any) -> Any:
        seen.append((handler, signal.pthread_sigmask(signal.SIG_BLOCK, set())))
        return None

    monkeypatch.setattr(signal, "signal", switch)

    cli._default_ctrl_c()

    assert seen == [(signal.SIG_DFL, before | {signal.SIGINT})]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before
