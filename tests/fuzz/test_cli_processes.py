"""Fuzz family "CLI processes": the real ``python -m kvbm_builder`` in a few hundred processes, for what only a process
shows: exit statuses, output encodings set by the environment (``PYTHONIOENCODING``, a C locale), arguments and
file names that are not UTF-8, and signals: Ctrl-C (SIGINT) while it works, a reader that went away (SIGPIPE, EPIPE),
SIGTERM.

A fixed number of runs (``RUNS``, drawn from their index, the same every time; ``--soak N`` runs N times as many,
up to ``SOAK_RUNS``), a few at a time. Every run must end with a documented status (0, 1, 2; 130 after Ctrl-C with
one line; 141 after its reader went away, quietly; killed by SIGTERM), print no traceback, finish within its time,
and leave no file behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from budget import soak_factor
from loader_cases import argv, cli_workspace, document_text, environ

RUNS = 240
SOAK_RUNS = 2400
PARALLEL = 4
LIMIT_S = 60

ENCODINGS = [
    {},
    {"PYTHONIOENCODING": "utf-8"},
    {"PYTHONIOENCODING": "ascii"},
    {"PYTHONIOENCODING": "latin-1:strict"},
    {"LC_ALL": "C", "LANG": "C"},
    {"LC_ALL": "POSIX", "PYTHONIOENCODING": "ascii:strict"},
    {"PYTHONUTF8": "0", "LC_ALL": "C"},
]


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    with cli_workspace() as root:
        for i in range(150):  # for Ctrl-C: seconds of work, so that the signal lands while main() runs
            (root / "many" / f"c{i}.json").parent.mkdir(exist_ok=True)
            (root / "many" / f"c{i}.json").write_bytes((root / "valid.json").read_bytes())
        yield root


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without its encoding or DYN_KVBM_* settings, and ``extra`` (a NUL cannot be
    in an environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_KVBM_", "PYTHONIOENCODING", "LC_", "LANG"))}
    env.update({k: v for k, v in extra.items() if "\0" not in v})
    return env


def one_run(index: int, root: Path) -> str | None:
    """Run ``index``: what went wrong, or None."""
    rng = random.Random(index)
    suffix, data = document_text(rng)
    drawn = root / f"drawn{index}{suffix}"
    drawn.write_bytes(data)
    args: list[str | bytes] = [str(drawn) if a == str(root / "drawn") else a for a in argv(rng, root)]
    env = clean_env({**rng.choice(ENCODINGS), **environ(rng)})
    action = rng.choice(["none", "none", "none", "pipe", "interrupt", "interrupt", "terminate"])
    if action == "interrupt":
        args = ["validate", *(str(root / "many" / f"c{i}.json") for i in range(rng.randrange(30, 150))), *args[1:]]
    # (an argument cannot hold a NUL: the system ends it there)
    command: list[str | bytes] = [sys.executable, "-m", "kvbm_builder", *(os.fsencode(a).split(b"\0")[0] for a in args)]
    try:
        status, err = run_process(command, env, action)
    finally:
        drawn.unlink()
    said = f"run {index}: {action} {command[3:8]!r}... -> {status}: {err[-500:]!r}"
    if b"Traceback" in err or b"Exception ignored" in err:
        return said
    allowed = {0, 1, 2}
    if action == "pipe":
        allowed.add(141)
    elif action == "interrupt":  # 130 with one line while main() runs; killed by SIGINT once it is over
        allowed |= {130, -signal.SIGINT}
    elif action == "terminate":
        allowed.add(-signal.SIGTERM)
    if status not in allowed:
        return said
    if status == 130 and not err.endswith(b"kvbm-builder: interrupted\n"):
        return said
    # quiet about the pipe; errors said before it stand, also one naming a FIFO given as a file ("a named pipe")
    if status == 141 and (b"Broken" in err or b"EPIPE" in err or b"Errno 32" in err):
        return said
    return None


def run_process(command: list[str | bytes], env: dict[str, str], action: str) -> tuple[int, bytes]:
    """(status, stderr) of ``command`` run with ``action``."""
    if action == "pipe":  # no reader from the start: the first write fails with EPIPE
        read, write = os.pipe()
        os.close(read)
        try:
            done = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, env=env, timeout=LIMIT_S, check=False)
        finally:
            os.close(write)
        return done.returncode, done.stderr
    if action == "none":
        done = subprocess.run(command, capture_output=True, env=env, timeout=LIMIT_S, check=False)
        return done.returncode, done.stderr
    # a signal once main() runs, which it does once it has written something: output goes to files, so that the
    # process never waits on a pipe nobody reads while this waits for it
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + LIMIT_S
        while process.poll() is None and os.fstat(out.fileno()).st_size + os.fstat(err.fileno()).st_size == 0:
            if time.monotonic() > deadline:
                process.kill()
                break
            time.sleep(0.002)
        if process.poll() is None:
            process.send_signal(signal.SIGINT if action == "interrupt" else signal.SIGTERM)
        status = process.wait(timeout=LIMIT_S)
        err.seek(0)
        return status, err.read()


def test_the_real_command_ends_with_a_documented_status_and_no_traceback(work: Path) -> None:
    runs = min(RUNS * soak_factor(), SOAK_RUNS) if soak_factor() else RUNS
    before = sorted(os.listdir(work)), sorted(os.listdir(work / "cache"))
    with ThreadPoolExecutor(PARALLEL) as pool:
        findings = [f for f in pool.map(lambda i: one_run(i + soak_factor() * 100_000, work), range(runs)) if f]
    assert findings == [], "\n".join(findings)
    assert (sorted(os.listdir(work)), sorted(os.listdir(work / "cache"))) == before
