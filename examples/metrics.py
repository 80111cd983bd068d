"""The offload round trip, watched through /metrics: what each step moved, as a Prometheus scrape shows it.

Runs the round trip of ``examples/offload_roundtrip.py`` (with an NVIDIA GPU: device -> pinned host -> disk and back;
without one: host -> disk and back) on a manager that serves its metrics on ``http://127.0.0.1:PORT/metrics``, fetches
that page over HTTP before the first step and after each one, and prints the lines that changed (before -> after).
Histogram buckets are left out of the listing (their ``_count`` and ``_sum`` lines show). At the end the manager
closes and so does the endpoint.

    python examples/metrics.py [--blocks N] [--disk-dir DIR] [--port PORT]

``--port 0`` (the default here) lets the OS pick a free port. A manager serves the same page by itself when
``DYN_KVBM_METRICS=1`` (on ``DYN_KVBM_METRICS_PORT``, 6880), as upstream's does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import urllib.error
import urllib.request

from offload_roundtrip import BLOCK_BYTES, RoundTripError, build, round_trip

from kvbm_builder import KvbmError
from kvbm_builder.storage import cuda_available, cuda_unavailable_reason


def fetch(url: str) -> dict[str, str]:
    """One scrape over HTTP, as {series: value} in the text format's own spelling."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text: str = response.read().decode()
    lines = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {series: number for series, number in lines}


def show_changes(step: str, before: dict[str, str], after: dict[str, str]) -> None:
    changed = [name for name in after if before.get(name) != after[name]]
    buckets = sum("_bucket{" in name for name in changed)
    shown = [name for name in changed if "_bucket{" not in name]
    width = max((len(name) for name in shown), default=0)
    note = f" ({buckets} of them histogram buckets)" if buckets else ""
    print(f"\nafter {step}: {len(changed)} lines moved{note}")
    for name in shown:
        print(f"  {name:<{width}}  {before.get(name, '-')} -> {after[name]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=None, help="blocks to move (default 64 with a GPU, 32 without)")
    parser.add_argument("--disk-dir", default=tempfile.gettempdir(), help="where the disk tier goes")
    parser.add_argument("--port", type=int, default=0, help="where /metrics is served (default: a free port)")
    args = parser.parse_args()
    gpu = cuda_available()
    if not gpu:
        print(f"no GPU ({cuda_unavailable_reason()}): host (system memory) <-> disk only")
    count = args.blocks or (64 if gpu else 32)

    try:
        with build(count, args.disk_dir, gpu) as manager:
            url = manager.serve_metrics(port=args.port).url  # 127.0.0.1 unless host= says otherwise
            print(f"serving {url} ({count} blocks of {BLOCK_BYTES // 2**20} MiB to move)")
            scrapes = [fetch(url)]

            def scrape_after(step: str) -> None:
                scrapes.append(fetch(url))
                show_changes(step, scrapes[-2], scrapes[-1])

            round_trip(manager, count, gpu, after=scrape_after)
            print(f"\nverified {count} blocks byte for byte; closing the manager")
    except (KvbmError, RoundTripError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        fetch(url)
    except urllib.error.URLError as err:
        print(f"{url} closed with the manager ({err.reason})")
        return 0
    print(f"error: {url} still answers after the manager closed", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
