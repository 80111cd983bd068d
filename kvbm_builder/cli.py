"""``kvbm-builder``: validate, plan and show KV block manager configurations, and print their JSON Schema.

Every command that reads a file applies the ``DYN_KVBM_*`` environment (unless ``--no-env``) and then the
``--set KEY=VALUE`` arguments: defaults < file < environment < arguments. Results go to stdout, errors to stderr.
Nothing is allocated: ``plan`` only compares what the configuration would take with what this machine has, read
through the storage modules' probes (imported when ``plan`` runs, so importing the CLI stays light).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs

from .config.allocators import DeviceAllocator, DiskAllocator, PinnedAllocator, SystemAllocator
from .config.manager import KvBlockManagerConfig
from .config.protocols import Tier
from .errors import ConfigError, LoadError, Problem

__all__ = ["main"]

EXIT_OK = 0
EXIT_INVALID = 1  # an invalid configuration, or a failed check
EXIT_USAGE = 2  # a usage error, or a file that cannot be read

_EPILOG = """\
exit status:
  0  valid (validate), every check passed (plan), or printed (show, schema)
  1  an invalid configuration, or a check that failed
  2  a usage error, a file that cannot be read, or a configuration that the chosen --format cannot express

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


class _Usage(Exception):
    """A --set argument that is not KEY=VALUE."""


def _overrides(pairs: Sequence[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise _Usage(f"--set takes KEY=VALUE, e.g. host_layout.size=8GiB; got {pair!r}")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
        except RecursionError:
            raise _Usage(f"--set {key}: the value is nested too deeply") from None
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


@attrs.frozen
class Finding:
    level: str  # "ok", "warn" or "fail"
    check: str
    message: str


def _memory(layout: Any) -> str:
    if layout.allocator is not None:
        return str(layout.allocator.storage_kind.value)
    if layout.storage:
        return f"{layout.storage[0].kind.value} (given)"
    return "logical" if layout.logical is not None else "none"


def _tiers(config: KvBlockManagerConfig) -> list[dict[str, Any]]:
    from .layout import LayoutSpec

    rows = []
    for tier, layout in config.tiers():
        try:
            spec = LayoutSpec.from_config(config.model, layout)
        except ConfigError as err:  # reported under the tier, where the configuration says how many blocks
            raise ConfigError(
                [Problem((tier.slot, *(p.path or ("num_blocks",))), p.message) for p in err.problems], "$"
            ) from None
        rows.append(
            {
                "tier": tier.name,
                "slot": tier.slot,
                "memory": _memory(layout),
                "layout": str(layout.layout_type),
                "blocks": layout.num_blocks,
                "bytes_per_block": spec.block_bytes,
                "total_bytes": spec.total_bytes,
                "allocations": spec.num_allocations,
                "alignment_overhead_bytes": spec.alignment_overhead,
            }
        )
    return rows


def _check_host(total: int, pinned: bool) -> list[Finding]:
    from .storage._base import human
    from .storage._host import meminfo, memlock_bytes, memlock_limit

    findings = []
    ram, available = meminfo("MemTotal"), meminfo("MemAvailable")
    if ram is None:
        findings.append(Finding("warn", "host RAM", "/proc/meminfo is not readable; cannot check host memory"))
    elif total > ram:
        findings.append(
            Finding("fail", "host RAM", f"the host tier needs {human(total)}; this machine has {human(ram)}")
        )
    elif available is not None and total > available:
        findings.append(
            Finding("warn", "host RAM", f"the host tier needs {human(total)}; only {human(available)} is available now")
        )
    else:
        findings.append(Finding("ok", "host RAM", f"the host tier needs {human(total)} of {human(ram)}"))
    if pinned:
        limit = memlock_bytes()
        if limit is None:
            findings.append(Finding("ok", "ulimit -l", "locked memory is unlimited"))
        elif limit < total:
            findings.append(
                Finding(
                    "warn",
                    "ulimit -l",
                    f"locked memory is limited to {memlock_limit()}, below the pinned tier's {human(total)}; "
                    "NIXL/RDMA registration may fail: raise it (ulimit -l unlimited, or docker --ulimit memlock=-1)",
                )
            )
        else:
            findings.append(Finding("ok", "ulimit -l", f"locked memory limit {memlock_limit()} covers the pinned tier"))
    return findings


def _check_disk(total: int, allocator: DiskAllocator) -> list[Finding]:
    from .storage._base import human

    directory = Path(allocator.directory)
    check = f"disk {allocator.directory}"
    if not directory.exists():
        return [
            Finding("fail", check, "the directory does not exist; create it or point DYN_KVBM_DISK_CACHE_DIR elsewhere")
        ]
    if not directory.is_dir():
        return [Finding("fail", check, "is not a directory")]
    if not os.access(directory, os.W_OK | os.X_OK):
        return [Finding("fail", check, "the directory is not writable by this user")]
    free = shutil.disk_usage(directory).free
    if total > free:
        return [Finding("fail", check, f"the disk tier needs {human(total)}; {human(free)} is free")]
    return [Finding("ok", check, f"the disk tier needs {human(total)} of {human(free)} free")]


def _gpu_memory(device_id: int) -> tuple[int, int] | str:
    """(free, total) bytes of GPU ``device_id``, or why they cannot be known (the storage modules' CUDA probe)."""
    from .storage._cuda import _probe

    count, reason = _probe()
    if reason is not None:
        return f"no GPU visible: {reason}"
    if device_id >= count:
        return f"GPU {device_id} is not visible ({count} visible)"
    try:
        import cupy

        with cupy.cuda.Device(device_id):
            free, total = cupy.cuda.runtime.memGetInfo()
    except Exception as exc:  # the probe passed, so this is the device itself (busy, lost, out of memory)
        return f"cannot read the memory of GPU {device_id} ({type(exc).__name__}: {exc})"
    return int(free), int(total)


def _check_device(total: int, allocator: DeviceAllocator) -> list[Finding]:
    from .storage._base import human

    check = f"GPU {allocator.device_id}"
    memory = _gpu_memory(allocator.device_id)
    if isinstance(memory, str):
        return [Finding("warn", check, f"{memory}; cannot check the device tier's {human(total)}")]
    free, whole = memory
    if total > whole:
        return [Finding("fail", check, f"the device tier needs {human(total)}; the GPU has {human(whole)}")]
    if total > free:
        return [Finding("warn", check, f"the device tier needs {human(total)}; {human(free)} is free now")]
    return [Finding("ok", check, f"the device tier needs {human(total)} of {human(free)} free")]


def _findings(config: KvBlockManagerConfig, rows: list[dict[str, Any]]) -> list[Finding]:
    totals = {row["tier"]: row["total_bytes"] for row in rows}
    findings: list[Finding] = []
    for tier, layout in config.tiers():
        allocator = layout.allocator
        if isinstance(allocator, DeviceAllocator):
            findings += _check_device(totals[tier.name], allocator)
        elif isinstance(allocator, (PinnedAllocator, SystemAllocator)):
            findings += _check_host(totals[tier.name], isinstance(allocator, PinnedAllocator))
        elif isinstance(allocator, DiskAllocator):
            findings += _check_disk(totals[tier.name], allocator)
    device, host, disk = (getattr(config, t.slot) for t in (Tier.G1, Tier.G2, Tier.G3))
    if device is not None and host is not None and host.num_blocks < device.num_blocks:
        findings.append(
            Finding(
                "warn",
                "tier sizes",
                f"the host tier holds {host.num_blocks} blocks, fewer than the device tier's {device.num_blocks}: "
                "KVBM writes through, so the host tier churns; make it at least as large as the device tier",
            )
        )
    if host is not None and disk is not None and disk.num_blocks < host.num_blocks:
        findings.append(
            Finding(
                "warn",
                "tier sizes",
                f"the disk tier holds {disk.num_blocks} blocks, fewer than the host tier's {host.num_blocks}: "
                "it churns; make it at least as large as the host tier",
            )
        )
    if disk is not None and host is None and device is not None:
        findings.append(Finding("ok", "tier sizes", "no host tier: the device tier offloads straight to disk"))
    return findings


_LAYOUT_NAMES = {
    "FullyContiguous": "FullyContiguous",
    "LayerSeparate(outer_contiguous=True)": "LayerSeparate/outer",
    "LayerSeparate(outer_contiguous=False)": "LayerSeparate/block",
}


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """The tiers as an aligned table that fits a terminal (numbers right-aligned)."""
    from .storage._base import human

    header = ["tier", "layout", "blocks", "block", "total", "allocs", "padding"]
    body = [
        [
            f"{row['tier']} {row['memory']}",
            _LAYOUT_NAMES.get(row["layout"], row["layout"]),
            f"{row['blocks']:,}",
            human(row["bytes_per_block"]),
            human(row["total_bytes"]),
            str(row["allocations"]),
            human(row["alignment_overhead_bytes"]),
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
    resolved = _resolve(args.file, args)
    config, settings = resolved.config, resolved.settings
    rows = _tiers(config)
    findings = _findings(config, rows)
    failed = any(f.level == "fail" for f in findings)
    if args.format == "json":
        document = {
            "file": args.file,
            "ok": not failed,
            "tiers": rows,
            "checks": [attrs.asdict(f) for f in findings],
            "settings": attrs.asdict(settings),
        }
        print(json.dumps(document, indent=2), file=out)
    else:
        print(f"{args.file}: {len(rows)} tier(s)" + (":" if rows else "; nothing to allocate"), file=out)
        if rows:
            for line in _table(rows):
                print(f"  {line}", file=out)
        if findings:
            print("checks:", file=out)
            width = max(len(f.check) for f in findings)
            for f in findings:
                print(f"  {f.level.upper():4}  {f.check.ljust(width)}  {f.message}", file=out)
        print(
            "settings: " + ", ".join(f"{k}={v}" for k, v in attrs.asdict(settings).items()),
            file=out,
        )
    return EXIT_INVALID if failed else EXIT_OK


# ---- show, schema ------------------------------------------------------------------------------------------------


def _show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .loading import dump, to_toml

    resolved = _resolve(args.file, args)
    data = dump(resolved.config)
    if args.format == "toml":
        try:
            text = to_toml(data, resolved.sources if args.sources else None)
        except ConfigError as error:  # a valid config TOML cannot spell (a null choice): a usage error
            print(f"{args.file}: {error} (--format json)", file=err)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see ``kvbm-builder --help``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    out, err = sys.stdout, sys.stderr
    try:
        return _COMMANDS[args.command](args, out, err)
    except _Usage as error:
        parser.error(str(error))
    except LoadError as error:
        print(str(error), file=err)
        return EXIT_USAGE
    except ConfigError as error:
        _print_errors(error, getattr(args, "file", "kvbm-builder"), err)
        return EXIT_INVALID
    except BrokenPipeError:  # `kvbm-builder schema | head`: the reader is gone; keep the exit quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return EXIT_OK
