"""Reading /metrics the way Prometheus does: over HTTP, in the text format, into (name, labels) -> value; and the
checks the manager's metrics tests share (what a scrape must show after given moves, skips and lookups)."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

from kvbm_builder import Tier
from kvbm_builder.metrics import DEFAULT_DURATION_BUCKETS, SKIP_REASONS, UPSTREAM_BLOCK_COUNTERS
from kvbm_builder.transfer import TransferRecord

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Path = tuple[Tier, Tier]


def fetch(url: str, accept: str | None = None) -> tuple[str, str]:
    """GET ``url``: the Content-Type header and the body."""
    headers = {"Accept": accept} if accept else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
        return response.headers["Content-Type"], response.read().decode()


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str) -> Samples:
    return parse(fetch(url)[1])


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every series of one sample name, by its labels."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


def free_port() -> int:
    """A port nobody listens on now (the OS's pick, released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def connection_refused(url: str) -> bool:
    """Whether nothing listens at ``url`` any more."""
    try:
        fetch(url)
    except urllib.error.URLError as err:
        return isinstance(err.reason, ConnectionRefusedError)
    return False


def path_labels(path: Path) -> dict[str, str]:
    return {"src_tier": path[0].name, "dst_tier": path[1].name}


def assert_counted(
    samples: Samples,
    *,
    block_bytes: int,
    moved: Mapping[Path, int] | None = None,
    failed: Mapping[Path, int] | None = None,
    skipped: Mapping[tuple[Tier, str], int] | None = None,
    requested_tokens: int = 0,
    matched_tokens: Mapping[Tier, int] | None = None,
) -> None:
    """Every counter of a scrape is what these moves, failures, skips and lookups make it, and nothing else counted.

    ``moved``: blocks whose copies completed, per (source, target) path (each ``block_bytes`` bytes); ``failed``:
    failed transfers per path; ``skipped``: offloads skipped per (target tier, reason); the tokens of the lookups.
    """
    moved, failed, skipped, matched = dict(moved or {}), dict(failed or {}), dict(skipped or {}), matched_tokens or {}
    for path, name in UPSTREAM_BLOCK_COUNTERS.items():  # upstream's names, bare and _total
        assert value(samples, name) == value(samples, name + "_total") == moved.get(path, 0), name
    labelled = [dict(labels) for labels in series(samples, "kvbm_transfer_blocks_total")]
    paths = {(Tier[labels["src_tier"]], Tier[labels["dst_tier"]]) for labels in labelled}
    assert set(moved) | set(failed) <= paths
    for path in paths:
        labels = path_labels(path)
        assert value(samples, "kvbm_transfer_blocks_total", **labels) == moved.get(path, 0), path
        assert value(samples, "kvbm_transfer_bytes_total", **labels) == moved.get(path, 0) * block_bytes, path
        assert value(samples, "kvbm_transfer_failures_total", **labels) == failed.get(path, 0), path
    for tier in (Tier.G2, Tier.G3):
        for reason in SKIP_REASONS:
            skips = value(samples, "kvbm_offload_skipped_blocks_total", dst_tier=tier.name, reason=reason)
            assert skips == skipped.get((tier, reason), 0), (tier, reason)
    assert value(samples, "kvbm_requested_tokens_total") == requested_tokens
    for tier in Tier:
        assert value(samples, "kvbm_tier_matched_tokens_total", tier=tier.name) == matched.get(tier, 0), tier
    below_device = matched.get(Tier.G2, 0) + matched.get(Tier.G3, 0)  # upstream's: what KVBM found below the GPU
    assert value(samples, "kvbm_matched_tokens") == value(samples, "kvbm_matched_tokens_total") == below_device


def assert_durations(samples: Samples, records: list[TransferRecord]) -> None:
    """The duration histogram of each path holds exactly the completed transfers ``records`` says it had."""
    paths = {(r.src_tier, r.dst_tier) for r in records} | set(UPSTREAM_BLOCK_COUNTERS)
    for path in paths:
        labels = path_labels(path)
        seconds = [r.seconds for r in records if (r.src_tier, r.dst_tier) == path and r.ok]
        assert value(samples, "kvbm_transfer_duration_seconds_count", **labels) == len(seconds), path
        assert abs(value(samples, "kvbm_transfer_duration_seconds_sum", **labels) - sum(seconds)) < 1e-9, path
        for bound in DEFAULT_DURATION_BUCKETS:
            within = sum(s <= bound for s in seconds)
            assert value(samples, "kvbm_transfer_duration_seconds_bucket", le=str(bound), **labels) == within
        assert value(samples, "kvbm_transfer_duration_seconds_bucket", le="+Inf", **labels) == len(seconds)


class Scraper(threading.Thread):
    """Scrapes ``url`` over and over until :meth:`stop`, keeping every scrape (or the error that ended it)."""

    def __init__(self, url: str) -> None:
        super().__init__(name="test-scraper", daemon=True)
        self.url = url
        self.scrapes: list[Samples] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self.scrapes.append(scrape(self.url))
        except BaseException as err:
            self.error = err

    def stop(self) -> list[Samples]:
        self._halt.set()
        self.join(timeout=60)
        assert self.error is None, self.error
        return self.scrapes
