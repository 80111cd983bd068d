"""``kvbm-builder``: validate, plan and show KV block manager configurations, and print their JSON Schema.

Every command that reads a file applies the ``DYN_KVBM_*`` environment (unless ``--no-env``) and then the
``--set KEY=VALUE`` arguments: defaults < file < environment < arguments. Results go to stdout, errors to stderr.
Nothing is allocated: ``plan`` prints :func:`kvbm_builder.plan.plan`, which compares what the configuration would
take with what this machine has (imported when ``plan`` runs, so importing the CLI stays light).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO, cast

import attrs

from .config.sizes import format_bytes
from .documents import parse_json
from .errors import ConfigError, LoadError, UsageError, show

__all__ = ["main"]

EXIT_OK = 0
EXIT_INVALID = 1  # an invalid configuration, or a failed check
EXIT_USAGE = 2  # a usage error, or a file that cannot be read
EXIT_INTERRUPTED = 128 + signal.SIGINT  # Ctrl-C, as a shell reports a process it ended
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # the reader of the output went away (`kvbm-builder schema | head -1`)

_EPILOG = """\
exit status:
  0  valid (validate), every check passed (plan), or printed (show, schema)
  1  an invalid configuration, or a check that failed
  2  a usage error, a file that cannot be read, or a configuration that the chosen --format cannot express
  130  interrupted (Ctrl-C);  141  the reader of the output went away

Values come from, lowest first: defaults < FILE < DYN_KVBM_* variables < --set arguments.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvbm-builder",
        description="Validate, plan and show KV block manager configurations (JSON, TOML or YAML).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help, description=help, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )

    def layers(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--no-env", action="store_true", help="ignore the DYN_KVBM_* environment variables")
        sub.add_argument(
            "--set",
            metavar="KEY=VALUE",
            action="append",
            default=[],
            help="set a value by its dotted path, e.g. host_layout.size=8GiB (VALUE is read as JSON when it parses "
            "as JSON, else as text; null removes the key); repeatable",
        )

    validate = command("validate", "check configuration files; print every problem with its path")
    validate.add_argument("files", nargs="+", metavar="FILE")
    layers(validate)

    plan = command("plan", "what each tier would take, checked against this machine; allocates nothing")
    plan.add_argument("file", metavar="FILE")
    plan.add_argument("--format", choices=("text", "json"), default="text")
    layers(plan)

    show = command("show", "print the resolved configuration")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--format", choices=("json", "toml"), default="json")
    show.add_argument("--sources", action="store_true", help="say where each value came from")
    layers(show)

    command("schema", "print a JSON Schema (draft 2020-12) of the configuration documents, for editors")
    return parser


def _overrides(pairs: Sequence[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set takes KEY=VALUE, e.g. host_layout.size=8GiB; got {show(pair, typed=False)}")
        try:  # JSON as files are read: a key given twice, NaN or an integer Python refuses is an error, not text
            out[key] = parse_json(text)
        except json.JSONDecodeError:
            out[key] = text
        except ValueError as err:
            raise UsageError(f"--set {key}: the value is JSON that a file may not hold: {err}") from None
        except RecursionError:
            raise UsageError(f"--set {key}: the value is nested too deeply") from None
    return out


def _resolve(path: str, args: argparse.Namespace) -> Any:
    from .loading import read_document, resolve

    environ: Mapping[str, str] = {} if args.no_env else os.environ
    return resolve(read_document(path), environ=environ, overrides=_overrides(args.set))


def _print_errors(err: ConfigError, prefix: str, stream: TextIO) -> None:
    for path, message in err.errors:
        print(f"{prefix}: {path}: {message}" if path else f"{prefix}: {message}", file=stream)


# ---- validate ----------------------------------------------------------------------------------------------------


def _validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    status = EXIT_OK
    for path in args.files:
        try:
            _resolve(path, args)
        except LoadError as error:
            print(str(error), file=err)  # one line, naming the file
            status = EXIT_USAGE
        except ConfigError as error:
            _print_errors(error, path, err)
            status = status or EXIT_INVALID
        else:
            print(f"{path}: ok", file=out)
    return status


# ---- plan --------------------------------------------------------------------------------------------------------


_LAYOUT_NAMES = {
    "FullyContiguous": "FullyContiguous",
    "LayerSeparate(outer_contiguous=True)": "LayerSeparate/outer",
    "LayerSeparate(outer_contiguous=False)": "LayerSeparate/block",
}


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """The tiers as an aligned table that fits a terminal (numbers right-aligned)."""
    header = ["tier", "layout", "blocks", "block", "total", "allocs", "padding"]
    body = [
        [
            f"{row['tier']} {row['memory']}",
            _LAYOUT_NAMES.get(row["layout"], row["layout"]),
            f"{row['blocks']:,}",
            format_bytes(row["bytes_per_block"]),
            format_bytes(row["total_bytes"]),
            str(row["allocations"]),
            format_bytes(row["alignment_overhead_bytes"]),
        ]
        for row in rows
    ]
    numeric = {2, 3, 4, 5, 6}
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return [
        "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in [header, *body]
    ]


def _plan(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .plan import plan

    resolved = _resolve(args.file, args)
    report = plan(resolved.config)
    rows = [attrs.asdict(row) for row in report.tiers]
    settings = attrs.asdict(resolved.settings)
    if args.format == "json":
        checks = [attrs.asdict(f) for f in report.findings]
        document = {"file": args.file, "ok": report.ok, "tiers": rows, "checks": checks, "settings": settings}
        print(json.dumps(document, indent=2), file=out)
    else:
        print(f"{args.file}: {len(rows)} tier(s)" + (":" if rows else "; nothing to allocate"), file=out)
        for line in _table(rows) if rows else []:
            print(f"  {line}", file=out)
        if report.findings:
            print("checks:", file=out)
            width = max(len(f.check) for f in report.findings)
            for f in report.findings:
                print(f"  {f.level.upper():4}  {f.check.ljust(width)}  {f.message}", file=out)
        print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), file=out)
    return EXIT_OK if report.ok else EXIT_INVALID


# ---- show, schema ------------------------------------------------------------------------------------------------


def _show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .loading import dump, to_toml

    resolved = _resolve(args.file, args)
    data = dump(resolved.config)
    if args.format == "toml":
        try:
            text = to_toml(data, resolved.sources if args.sources else None)
        except ConfigError as error:  # a value TOML cannot hold: this --format cannot express the configuration
            print(f"{args.file}: cannot be shown as TOML: {error}", file=err)
            return EXIT_USAGE
        print(text, end="", file=out)
    elif args.sources:
        print(json.dumps({"config": data, "sources": dict(resolved.sources)}, indent=2), file=out)
    else:
        print(json.dumps(data, indent=2), file=out)
    return EXIT_OK


def _schema(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .loading import json_schema

    print(json.dumps(json_schema(), indent=2), file=out)
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]] = {
    "validate": _validate,
    "plan": _plan,
    "show": _show,
    "schema": _schema,
}


class _Escaping:
    """A text stream that writes what its encoding cannot hold as backslash escapes instead of raising: a file name
    with bytes that are not UTF-8 (``\\udcff``), a lone surrogate in a value, any non-ASCII text where the output
    is ASCII (``PYTHONIOENCODING=ascii``). Everything else is the stream's own."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except UnicodeEncodeError:  # raised before anything is written: the text is encoded whole first
            encoding = getattr(self._stream, "encoding", None) or "utf-8"
            return self._stream.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _silence_output() -> None:
    """After a broken pipe: point stdout and stderr at /dev/null, so that Python's flush at exit stays quiet."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):  # a stream without a descriptor (in-process)
            os.dup2(null, stream.fileno())
    os.close(null)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see ``kvbm-builder --help``).

    Whatever it prints is escaped where the output's encoding cannot hold it; Ctrl-C ends it with status 130 and
    one line, a reader that went away with status 141 and none. Run as the program (``argv`` None: the console
    script, ``python -m kvbm_builder``), a Ctrl-C that comes once the command is over, while Python shuts down, ends
    the process as Ctrl-C ends any program, instead of with a traceback from Python's own shutdown."""
    out, err = cast(TextIO, _Escaping(sys.stdout)), cast(TextIO, _Escaping(sys.stderr))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # argparse prints to sys.stdout/err
            try:
                return _run(argv, out, err)
            finally:  # also after argparse's exit (--help): a reader that went away is seen here, not at shutdown
                out.flush()
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            print("kvbm-builder: interrupted", file=err)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_output()
        return EXIT_BROKEN_PIPE
    finally:
        # From here Ctrl-C ends the process as it ends any program. Written with no call before the `try`: Python
        # raises a pending KeyboardInterrupt after a call returns or on entering a function, which would land
        # outside it. signal.signal() raises one still pending before it switches: then it is called again.
        switched = argv is not None
        while not switched:
            try:
                _default_ctrl_c()
                switched = True
            except KeyboardInterrupt:  # the command is over anyway
                pass
            except ValueError:  # not the main thread: signals are not this thread's to set
                switched = True


def _default_ctrl_c() -> None:
    """SIGINT back to its default action, blocked while it switches where the system can block it: a Ctrl-C that
    came between Python's check for pending signals and the switch would be printed as a traceback ("Signal 2
    ignored due to race condition"); blocked, it waits in the kernel and ends the process once unblocked."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:  # no signal masks (Windows)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        return
    before = mask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    finally:
        mask(signal.SIG_SETMASK, before)


def _run(argv: Sequence[str] | None, out: TextIO, err: TextIO) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args, out, err)
    except UsageError as error:
        parser.error(str(error))
    except LoadError as error:
        print(str(error), file=err)
        return EXIT_USAGE
    except ConfigError as error:
        _print_errors(error, getattr(args, "file", "kvbm-builder"), err)
        return EXIT_INVALID
