"""Fuzz family "CLI argv": ``kvbm_builder.cli.main(argv)`` in this process, over drawn command lines: every command
(and none, and words that are none), files of every kind (valid, invalid, drawn documents, a named pipe, a directory,
``/dev/zero``, a file past the size cap, nested YAML aliases, names that are not UTF-8, names too long, missing
ones), ``--set`` with any key and any value (JSON a file would refuse, nested past what Python parses, thousands of
digits), ``--format``, ``--sources``, ``--no-env`` or drawn ``DYN_KVBM_*`` variables, and output written to streams
of several encodings that refuse what they cannot encode (as a terminal's does).

Every input must end with status 0, 1 or 2 (argparse's own exit for usage), print no traceback, print JSON where
JSON was asked for, finish in bounded time, and leave no descriptor or file behind (``plan`` allocates nothing).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from budget import fuzz
from hypothesis import given
from loader_cases import SEEDS, argv, cli_workspace, document_text, environ, environment, nothing_left
from syscalls import watchdog

from kvbm_builder import cli

ENCODINGS = [("utf-8", "strict"), ("ascii", "strict"), ("latin-1", "strict"), ("utf-8", "surrogateescape")]


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    with cli_workspace() as root:
        yield root


def run(args: list[str], encoding: str, errors: str) -> tuple[int, str, str]:
    out = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors, write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors, write_through=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(args)
        except SystemExit as exit:  # argparse's usage errors and --help
            assert exit.code in (0, 2), exit.code
            status = int(exit.code or 0)
    texts = [s.buffer.getvalue().decode(encoding, errors) for s in (out, err)]  # type: ignore[attr-defined]
    return status, texts[0], texts[1]


def asks_for_json(args: list[str]) -> bool:
    """Whether ``args`` ask for JSON on stdout: ``schema``, ``show`` (JSON unless told), ``plan --format json``."""
    if {"-h", "--help", "--"} & set(args) or not args:
        return False
    at = args.index("--format") if "--format" in args else -1
    chosen = args[at + 1] if 0 <= at < len(args) - 1 else None
    return (
        args[0] == "schema" or (args[0] == "show" and chosen in (None, "json")) or (args[0], chosen) == ("plan", "json")
    )


@fuzz()
@given(seed=SEEDS)
def test_the_command_line_exits_0_1_or_2_with_no_traceback(work: Path, seed: int) -> None:
    rng = random.Random(seed)
    suffix, data = document_text(rng)
    drawn = work / f"drawn{suffix}"
    drawn.write_bytes(data)
    args = [str(drawn) if a == str(work / "drawn") else a for a in argv(rng, work)]
    encoding, errors = rng.choice(ENCODINGS)
    env = environ(rng)
    with watchdog(60), environment(env), nothing_left(str(work)), nothing_left(str(work / "cache")):
        status, out, err = run(args, encoding, errors)
    assert status in (0, 1, 2), (args, status, err)
    assert "Traceback" not in out + err, err
    if status == 0 and asks_for_json(args):
        json.loads(out)
    if status != 0:  # says why: on stderr, or (plan's failed checks) in its report
        reported = args[0] == "plan" and ("FAIL" in out or '"level": "fail"' in out)
        assert err or reported, "a failure that says nothing"
    drawn.unlink()
