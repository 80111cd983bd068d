"""KvbmMetrics by example: record what the block manager did, scrape /metrics over loopback, read the numbers."""

from __future__ import annotations

import inspect
import logging
import math
import pickle
import socket
import subprocess
import sys
import threading
import urllib.error
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from scraping import fetch, parse, scrape, value

from kvbm_builder import KvbmError, Tier
from kvbm_builder.errors import MetricsError, MetricsRegistryError, MetricsServerError
from kvbm_builder.metrics import (
    DEFAULT_DURATION_BUCKETS,
    UPSTREAM_BLOCK_COUNTERS,
    HitRateWindow,
    KvbmMetrics,
    MetricsServer,
    NullKvbmMetrics,
    TierBlocks,
)

G1, G2, G3 = Tier.G1, Tier.G2, Tier.G3
BLOCK = 64 * 1024  # bytes per block in these examples


@pytest.fixture
def metrics() -> Iterator[KvbmMetrics]:
    with KvbmMetrics(CollectorRegistry()) as metrics:
        yield metrics


@pytest.fixture
def url(metrics: KvbmMetrics) -> str:
    return metrics.serve(port=0).url


# ---- the example -------------------------------------------------------------------------------------------------


def test_an_offload_and_an_onboard_scraped_over_http(metrics: KvbmMetrics, url: str) -> None:
    metrics.record_transfer(G1, G2, num_blocks=4, nbytes=4 * BLOCK, seconds=0.003, ok=True)  # offload d2h
    metrics.record_transfer(G2, G1, num_blocks=2, nbytes=2 * BLOCK, seconds=0.001, ok=True)  # onboard h2d
    metrics.record_lookup(requested_tokens=128, matched_tokens_by_tier={G2: 64})

    samples = scrape(url)

    # upstream's names, as its dashboards query them, and the conventional counters beside them
    assert value(samples, "kvbm_offload_blocks_d2h") == value(samples, "kvbm_offload_blocks_d2h_total") == 4
    assert value(samples, "kvbm_onboard_blocks_h2d") == value(samples, "kvbm_onboard_blocks_h2d_total") == 2
    assert value(samples, "kvbm_offload_blocks_h2d") == 0
    assert value(samples, "kvbm_matched_tokens") == value(samples, "kvbm_matched_tokens_total") == 64
    assert value(samples, "kvbm_host_cache_hit_rate") == 0.5
    assert value(samples, "kvbm_disk_cache_hit_rate") == 0.0
    # the same moves by path, in bytes, and how long they took
    assert value(samples, "kvbm_transfer_blocks_total", src_tier="G1", dst_tier="G2") == 4
    assert value(samples, "kvbm_transfer_bytes_total", src_tier="G1", dst_tier="G2") == 4 * BLOCK
    assert value(samples, "kvbm_transfer_bytes_total", src_tier="G2", dst_tier="G1") == 2 * BLOCK
    assert value(samples, "kvbm_transfer_duration_seconds_count", src_tier="G1", dst_tier="G2") == 1
    assert value(samples, "kvbm_transfer_duration_seconds_sum", src_tier="G1", dst_tier="G2") == 0.003
    assert value(samples, "kvbm_transfer_duration_seconds_bucket", src_tier="G1", dst_tier="G2", le="0.0025") == 0
    assert value(samples, "kvbm_transfer_duration_seconds_bucket", src_tier="G1", dst_tier="G2", le="0.005") == 1
    assert value(samples, "kvbm_requested_tokens_total") == 128
    assert value(samples, "kvbm_tier_matched_tokens_total", tier="G2") == 64


def test_the_text_a_scrape_shows_for_an_upstream_counter(metrics: KvbmMetrics, url: str) -> None:
    metrics.record_transfer(G1, G2, 3, 3 * BLOCK, 0.002, True)

    content_type, text = fetch(url)

    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    lines = text.splitlines()
    bare = lines.index("# TYPE kvbm_offload_blocks_d2h untyped")
    assert lines[bare + 1] == "kvbm_offload_blocks_d2h 3.0"
    conventional = lines.index("# TYPE kvbm_offload_blocks_d2h_total counter")
    assert lines[conventional + 1] == "kvbm_offload_blocks_d2h_total 3.0"
    assert not [line for line in lines if "_created" in line]  # no creation-time series


def test_every_scraper_gets_the_text_format_even_one_asking_for_openmetrics(url: str) -> None:
    # In OpenMetrics a counter named kvbm_offload_blocks_d2h is the family of ..._total, so upstream's bare name
    # cannot be served beside it; Prometheus takes the text format whatever it asked for.
    for accept in ("application/openmetrics-text; version=1.0.0; charset=utf-8", "text/plain;version=1.0.0", "*/*"):
        content_type, text = fetch(url, accept=accept)

        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        assert "kvbm_offload_blocks_d2h 0.0" in text.splitlines()


@pytest.mark.parametrize(("path", "name"), list(UPSTREAM_BLOCK_COUNTERS.items()), ids=lambda p: str(p))
def test_each_upstream_counter_counts_its_own_path_only(
    metrics: KvbmMetrics, path: tuple[Tier, Tier], name: str
) -> None:
    metrics.record_transfer(*path, num_blocks=5, nbytes=5 * BLOCK, seconds=0.01, ok=True)

    samples = parse(generate_latest(metrics.registry).decode())

    for other in UPSTREAM_BLOCK_COUNTERS.values():
        expected = 5 if other == name else 0
        assert value(samples, other) == value(samples, other + "_total") == expected, other


def test_a_failed_transfer_counts_as_failed_not_as_moved(metrics: KvbmMetrics, url: str) -> None:
    metrics.record_transfer(G2, G3, num_blocks=8, nbytes=8 * BLOCK, seconds=0.2, ok=False)

    samples = scrape(url)

    assert value(samples, "kvbm_transfer_failures_total", src_tier="G2", dst_tier="G3") == 1
    assert value(samples, "kvbm_offload_blocks_h2d") == 0
    assert value(samples, "kvbm_transfer_blocks_total", src_tier="G2", dst_tier="G3") == 0
    assert value(samples, "kvbm_transfer_bytes_total", src_tier="G2", dst_tier="G3") == 0
    assert value(samples, "kvbm_transfer_duration_seconds_count", src_tier="G2", dst_tier="G3") == 0


def test_a_path_upstream_has_no_name_for_is_counted_by_its_labels(metrics: KvbmMetrics, url: str) -> None:
    metrics.record_transfer(G3, G2, num_blocks=1, nbytes=BLOCK, seconds=0.5, ok=True)  # disk to host

    samples = scrape(url)

    assert value(samples, "kvbm_transfer_blocks_total", src_tier="G3", dst_tier="G2") == 1
    assert value(samples, "kvbm_transfer_bytes_total", src_tier="G3", dst_tier="G2") == BLOCK
    assert all(value(samples, name) == 0 for name in UPSTREAM_BLOCK_COUNTERS.values())


def test_skipped_offloads_by_target_tier_and_reason(metrics: KvbmMetrics, url: str) -> None:
    metrics.record_skipped(G2, "tier_full")
    metrics.record_skipped(G3, "filter", num_blocks=3)
    metrics.record_skipped(G3, "filter")

    samples = scrape(url)

    assert value(samples, "kvbm_offload_skipped_blocks_total", dst_tier="G2", reason="tier_full") == 1
    assert value(samples, "kvbm_offload_skipped_blocks_total", dst_tier="G3", reason="filter") == 4
    assert value(samples, "kvbm_offload_skipped_blocks_total", dst_tier="G3", reason="tier_full") == 0
    assert value(samples, "kvbm_offload_skipped_blocks_total", dst_tier="G2", reason="filter") == 0


def test_blocks_per_tier_by_state_are_read_from_the_managers_callback_at_each_scrape(
    metrics: KvbmMetrics, url: str
) -> None:
    pool = {G1: TierBlocks(free=10, active=0, inactive=0), G2: TierBlocks(free=100, active=0, inactive=0)}
    metrics.set_block_counts_source(lambda: pool)
    metrics.set_allocated_bytes(G1, 10 * BLOCK)
    metrics.set_allocated_bytes(G2, 100 * BLOCK)

    before = scrape(url)
    pool[G1] = TierBlocks(free=6, active=3, inactive=1)
    after = scrape(url)

    assert value(before, "kvbm_tier_blocks", tier="G1", state="free") == 10
    assert value(after, "kvbm_tier_blocks", tier="G1", state="free") == 6
    assert value(after, "kvbm_tier_blocks", tier="G1", state="active") == 3
    assert value(after, "kvbm_tier_blocks", tier="G1", state="inactive") == 1
    assert value(after, "kvbm_tier_blocks", tier="G2", state="free") == 100
    assert value(after, "kvbm_tier_allocated_bytes", tier="G1") == 10 * BLOCK
    assert value(after, "kvbm_tier_allocated_bytes", tier="G2") == 100 * BLOCK
    assert not [k for k in after if k[0] == "kvbm_tier_blocks" and ("tier", "G3") in k[1]]  # no G3 tier here

    metrics.set_block_counts_source(None)
    assert not [k for k in scrape(url) if k[0] == "kvbm_tier_blocks"]


def test_a_failing_block_counts_callback_costs_its_series_not_the_scrape(
    metrics: KvbmMetrics, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Mapping[Tier, TierBlocks]:
        raise RuntimeError("pool is closing")

    metrics.set_block_counts_source(broken)
    metrics.record_transfer(G1, G2, 1, BLOCK, 0.001, True)

    with caplog.at_level(logging.WARNING, logger="kvbm_builder.metrics"):
        samples = scrape(url)

    assert value(samples, "kvbm_offload_blocks_d2h") == 1
    assert not [k for k in samples if k[0] == "kvbm_tier_blocks"]
    assert "block counts callback failed" in caplog.text and "pool is closing" in caplog.text


# ---- the hit-rate window -----------------------------------------------------------------------------------------


def test_the_hit_rates_over_a_sliding_window_upstreams_own_example() -> None:
    window = HitRateWindow(max_requests=3)
    for requested, host, disk in [(10, 10, 5), (10, 0, 0), (10, 5, 5), (10, 10, 10), (10, 0, 0)]:
        window.record(requested, host, disk)

    # the first two requests have left the window: (5 + 10 + 0) / 30 for both tiers
    assert len(window) == 3
    assert window.host_hit_rate == 0.5
    assert window.disk_hit_rate == 0.5


def test_requests_that_asked_for_nothing_stay_out_of_the_window(metrics: KvbmMetrics) -> None:
    small = KvbmMetrics(cache_stats_max_requests=2)
    small.record_lookup(100, {G2: 100})
    small.record_lookup(100, {G3: 100})
    small.record_lookup(0, {})  # nothing queried: the two requests above stay in the window

    samples = parse(generate_latest(small.registry).decode())

    assert value(samples, "kvbm_host_cache_hit_rate") == 0.5
    assert value(samples, "kvbm_disk_cache_hit_rate") == 0.5
    assert HitRateWindow(5).host_hit_rate == 0.0  # empty window: 0, as upstream


def split(requested: int) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """(requested, found on the device, in the host, on the disk): three cuts of the requested tokens."""
    cuts = st.lists(st.integers(0, requested), min_size=3, max_size=3).map(sorted)
    return cuts.map(lambda c: (requested, c[0], c[1] - c[0], c[2] - c[1]))


lookups = st.lists(st.integers(0, 1000).flatmap(split), max_size=60)


@given(max_requests=st.integers(1, 8), requests=lookups)
def test_the_window_matches_a_list_of_the_last_n_requests(
    max_requests: int, requests: list[tuple[int, int, int, int]]
) -> None:
    window = HitRateWindow(max_requests)
    metrics = KvbmMetrics(cache_stats_max_requests=max_requests)
    for requested, device, host, disk in requests:
        window.record(requested - device, host, disk)
        metrics.record_lookup(requested, {G1: device, G2: host, G3: disk})

    # upstream's rates are about the tokens the device did not hold; a request the device answered whole is left out
    kept = [(r - d, h, k) for r, d, h, k in requests if r - d > 0][-max_requests:]
    asked = sum(r[0] for r in kept)
    assert window.sums() == (asked, sum(r[1] for r in kept), sum(r[2] for r in kept))
    host_rate = sum(r[1] for r in kept) / asked if asked else 0.0
    disk_rate = sum(r[2] for r in kept) / asked if asked else 0.0
    assert (window.host_hit_rate, window.disk_hit_rate) == (host_rate, disk_rate)
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "kvbm_host_cache_hit_rate") == pytest.approx(host_rate, rel=1e-15)
    assert value(samples, "kvbm_disk_cache_hit_rate") == pytest.approx(disk_rate, rel=1e-15)
    # the counters count every token: a token hit rate per tier is tier_matched / requested
    assert value(samples, "kvbm_requested_tokens_total") == sum(r[0] for r in requests)
    for tier, at in ((G1, 1), (G2, 2), (G3, 3)):
        assert value(samples, "kvbm_tier_matched_tokens_total", tier=tier.name) == sum(r[at] for r in requests)
    assert value(samples, "kvbm_matched_tokens") == sum(r[2] + r[3] for r in requests)  # upstream's: below G1


def test_a_lookup_counts_device_hits_but_upstreams_rates_look_below_the_device(metrics: KvbmMetrics, url: str) -> None:
    metrics.record_lookup(100, {G1: 50, G2: 25, G3: 5})  # 50 tokens left to find below the device: 25 + 5 found
    metrics.record_lookup(64, {G1: 64})  # the device held it all: nothing to look up below it

    samples = scrape(url)

    assert value(samples, "kvbm_requested_tokens_total") == 164
    assert value(samples, "kvbm_tier_matched_tokens_total", tier="G1") == 114
    assert value(samples, "kvbm_matched_tokens") == value(samples, "kvbm_matched_tokens_total") == 30
    assert value(samples, "kvbm_host_cache_hit_rate") == 25 / 50
    assert value(samples, "kvbm_disk_cache_hit_rate") == 5 / 50


# ---- the duration histogram --------------------------------------------------------------------------------------


@given(st.lists(st.floats(0, 20, allow_nan=False), max_size=40))
def test_each_duration_bucket_counts_the_transfers_that_took_at_most_its_bound(durations: list[float]) -> None:
    metrics = KvbmMetrics()
    for seconds in durations:
        metrics.record_transfer(G1, G2, 1, BLOCK, seconds, True)

    samples = parse(generate_latest(metrics.registry).decode())

    path = {"src_tier": "G1", "dst_tier": "G2"}
    for bound in DEFAULT_DURATION_BUCKETS:
        expected = sum(1 for d in durations if d <= bound)
        assert value(samples, "kvbm_transfer_duration_seconds_bucket", le=str(bound), **path) == expected, bound
    assert value(samples, "kvbm_transfer_duration_seconds_bucket", le="+Inf", **path) == len(durations)
    assert value(samples, "kvbm_transfer_duration_seconds_count", **path) == len(durations)
    assert value(samples, "kvbm_transfer_duration_seconds_sum", **path) == pytest.approx(math.fsum(durations))


def test_duration_buckets_of_your_own() -> None:
    metrics = KvbmMetrics(duration_buckets=[0.01, 1])
    metrics.record_transfer(G1, G2, 1, BLOCK, 0.5, True)

    samples = parse(generate_latest(metrics.registry).decode())

    buckets = {dict(k[1])["le"]: v for k, v in samples.items() if k[0] == "kvbm_transfer_duration_seconds_bucket"}
    assert set(buckets) == {"0.01", "1.0", "+Inf"}


# ---- concurrency -------------------------------------------------------------------------------------------------


def test_a_slow_scrape_never_holds_up_recording(metrics: KvbmMetrics, url: str) -> None:
    scrape_started, release_scrape = threading.Event(), threading.Event()

    def slow_block_counts() -> Mapping[Tier, TierBlocks]:
        scrape_started.set()
        release_scrape.wait(timeout=60)
        return {G1: TierBlocks(1, 0, 0)}

    metrics.set_block_counts_source(slow_block_counts)
    stuck: list[str] = []
    scraper = threading.Thread(target=lambda: stuck.append(fetch(url)[1]))
    scraper.start()
    assert scrape_started.wait(timeout=60)

    recorder = threading.Thread(
        target=lambda: [metrics.record_transfer(G1, G2, 1, BLOCK, 0.001, True) for _ in range(1000)]
    )
    recorder.start()
    recorder.join(timeout=60)
    finished_while_scrape_was_stuck = not recorder.is_alive() and not release_scrape.is_set()
    release_scrape.set()
    scraper.join(timeout=60)

    assert finished_while_scrape_was_stuck
    assert "kvbm_offload_blocks_d2h 0.0" in stuck[0].splitlines()  # numbers from before the callback was called
    assert value(scrape(url), "kvbm_offload_blocks_d2h") == 1000


def test_recording_from_many_threads_loses_nothing(metrics: KvbmMetrics, url: str) -> None:
    def work() -> None:
        for _ in range(500):
            metrics.record_transfer(G1, G2, 2, 2 * BLOCK, 0.001, True)
            metrics.record_skipped(G3, "filter")
            metrics.record_lookup(32, {G2: 16, G3: 16})

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    samples = scrape(url)
    assert value(samples, "kvbm_offload_blocks_d2h") == 8 * 500 * 2
    assert value(samples, "kvbm_transfer_bytes_total", src_tier="G1", dst_tier="G2") == 8 * 500 * 2 * BLOCK
    assert value(samples, "kvbm_offload_skipped_blocks_total", dst_tier="G3", reason="filter") == 8 * 500
    assert value(samples, "kvbm_matched_tokens") == 8 * 500 * 32


# ---- registries --------------------------------------------------------------------------------------------------


def test_a_registry_that_already_holds_these_names_is_refused() -> None:
    registry = CollectorRegistry()
    first = KvbmMetrics(registry)

    with pytest.raises(MetricsRegistryError) as caught:
        KvbmMetrics(registry)

    assert "kvbm_offload_blocks_d2h" in str(caught.value) and "its own registry" in str(caught.value)
    assert isinstance(caught.value, KvbmError)
    first.close()  # frees the names
    KvbmMetrics(registry).close()


def test_a_users_own_metric_of_an_upstream_name_is_refused_too() -> None:
    registry = CollectorRegistry()
    Counter("kvbm_matched_tokens", "the user's own", registry=registry)

    with pytest.raises(MetricsRegistryError, match="kvbm_matched_tokens"):
        KvbmMetrics(registry)


def test_the_process_global_registry_is_used_only_when_passed() -> None:
    with KvbmMetrics() as private:
        assert private.registry is not REGISTRY
        assert b"kvbm_" not in generate_latest(REGISTRY)
    with KvbmMetrics(REGISTRY):
        assert b"kvbm_offload_blocks_d2h 0.0" in generate_latest(REGISTRY)
    assert b"kvbm_" not in generate_latest(REGISTRY)  # closed: unregistered


def test_the_users_own_metrics_on_the_registry_are_served_beside_these(url: str, metrics: KvbmMetrics) -> None:
    Counter("my_requests", "requests served", registry=metrics.registry).inc(7)

    assert value(scrape(url), "my_requests_total") == 7


def test_a_registry_must_be_a_registry() -> None:
    with pytest.raises(MetricsError, match="registry must be a prometheus_client CollectorRegistry"):
        KvbmMetrics({})  # type: ignore[arg-type]


# ---- the endpoint ------------------------------------------------------------------------------------------------


def test_serve_binds_loopback_by_default_and_reports_the_port_the_os_chose(metrics: KvbmMetrics) -> None:
    server = metrics.serve(port=0)

    assert server.host == "127.0.0.1" and server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    assert inspect.signature(KvbmMetrics.serve).parameters["port"].default == 6880  # DYN_KVBM_METRICS_PORT's default
    assert inspect.signature(KvbmMetrics.serve).parameters["host"].default == "127.0.0.1"


def test_another_address_only_when_asked(metrics: KvbmMetrics) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server = metrics.serve(port=0, host="::1")
    except MetricsServerError as err:
        pytest.skip(f"::1 cannot be bound here: {err}")

    assert server.url == f"http://[::1]:{server.port}/metrics"
    assert "kvbm_offload_blocks_d2h 0.0" in fetch(server.url)[1].splitlines()


def test_a_port_in_use_is_an_error_naming_the_variable(metrics: KvbmMetrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(MetricsServerError) as caught:
            metrics.serve(port=port)

    assert "DYN_KVBM_METRICS_PORT" in str(caught.value) and f"127.0.0.1:{port}" in str(caught.value)
    assert "already in use" in str(caught.value)
    assert (caught.value.host, caught.value.port) == ("127.0.0.1", port)
    restored = pickle.loads(pickle.dumps(caught.value))
    assert (str(restored), restored.port) == (str(caught.value), port)


def test_an_address_that_is_not_this_machines_is_an_error(metrics: KvbmMetrics) -> None:
    with pytest.raises(MetricsServerError, match=r"cannot serve /metrics on 'no\.such\.host\.invalid'"):
        metrics.serve(port=0, host="no.such.host.invalid")
    with pytest.raises(MetricsError, match=r"port must be 0\.\.65535"):
        metrics.serve(port=70000)


def test_closing_the_metrics_stops_the_endpoint_and_frees_the_port() -> None:
    metrics = KvbmMetrics()
    server = metrics.serve(port=0)
    assert scrape(server.url)

    metrics.close()
    metrics.close()  # idempotent

    assert server.closed
    with pytest.raises(urllib.error.URLError):
        fetch(server.url)
    with KvbmMetrics() as next_manager:  # the port is free for the next manager
        assert next_manager.serve(port=server.port).port == server.port
    with pytest.raises(MetricsError, match="closed"):
        metrics.serve(port=0)
    metrics.record_transfer(G1, G2, 1, BLOCK, 0.001, True)  # harmless after close


def test_a_server_of_its_own_closes_by_itself(metrics: KvbmMetrics) -> None:
    with MetricsServer(metrics.registry, port=0) as server:
        assert value(scrape(server.url), "kvbm_matched_tokens") == 0
    assert server.closed and "closed" in repr(server)


# ---- bad arguments -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.record_transfer(G1, G2, -1, 0, 0.0, True), "num_blocks must be a whole number >= 0, got -1"),
        (lambda m: m.record_transfer(G1, G2, 1, 1.5, 0.0, True), "nbytes must be a whole number >= 0, got 1.5"),
        (lambda m: m.record_transfer(G1, G2, 1, 1, math.nan, True), "seconds must be a finite duration >= 0"),
        (lambda m: m.record_transfer(G1, G2, 1, 1, -0.5, True), "seconds must be a finite duration >= 0"),
        (lambda m: m.record_transfer("G1", G2, 1, 1, 0.1, True), "src must be a kvbm_builder.Tier"),
        (lambda m: m.record_skipped(G2, "full"), "reason must be one of tier_full, filter, got 'full'"),
        (lambda m: m.record_skipped("disk", "filter"), "tier must be a kvbm_builder.Tier"),
        (lambda m: m.record_lookup(10, {G2: 8, G3: 8}), "adds up to 16 tokens, more than the 10 requested_tokens"),
        (lambda m: m.record_lookup(10, {"G2": 1}), "a key of matched_tokens_by_tier must be a kvbm_builder.Tier"),
        (lambda m: m.record_lookup(-1, {}), "requested_tokens must be a whole number >= 0"),
        (lambda m: m.set_allocated_bytes(G1, -1), "nbytes must be a whole number >= 0"),
    ],
)
def test_bad_values_are_refused_naming_the_argument(metrics: KvbmMetrics, call: object, message: str) -> None:
    with pytest.raises(MetricsError) as caught:
        call(metrics)  # type: ignore[operator]

    assert message in str(caught.value)
    # nothing was counted
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "kvbm_requested_tokens_total") == 0
    assert all(v == 0 for (name, _), v in samples.items() if name.startswith("kvbm_") and "_bytes" not in name)


@pytest.mark.parametrize("size", [0, -3, 1.5, True])
def test_the_window_holds_at_least_one_request(size: object) -> None:
    with pytest.raises(MetricsError, match="DYN_KVBM_CACHE_STATS_MAX_REQUESTS"):
        KvbmMetrics(cache_stats_max_requests=size)  # type: ignore[arg-type]


def test_the_window_takes_any_size_upstream_takes() -> None:
    window = HitRateWindow(2**64 - 1)  # a usize, as KvbmSettings.cache_stats_max_requests allows
    window.record(10, 5, 0)

    assert (window.max_requests, len(window), window.host_hit_rate) == (2**64 - 1, 1, 0.5)


@pytest.mark.parametrize("buckets", [[], [0.1, 0.01], [0.0, 1.0], [1.0, math.inf], [0.1, 0.1]])
def test_duration_buckets_must_increase(buckets: list[float]) -> None:
    with pytest.raises(MetricsError, match="duration_buckets must be increasing"):
        KvbmMetrics(duration_buckets=buckets)


def test_numpy_integers_count_like_ints(metrics: KvbmMetrics) -> None:
    import numpy as np

    metrics.record_transfer(G1, G2, np.int64(2), np.uint64(2 * BLOCK), np.float32(0.5), np.bool_(True))

    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "kvbm_transfer_bytes_total", src_tier="G1", dst_tier="G2") == 2 * BLOCK


# ---- the README ---------------------------------------------------------------------------------------------------


def test_the_readme_example_runs_and_serves_what_it_recorded() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Metrics") : readme.index("## Layout of the code")]
    blocks = [block.split("```")[0] for block in section.split("```python")[1:]]
    code = next(block for block in blocks if "KvbmMetrics(CollectorRegistry()" in block)
    namespace: dict[str, Any] = {}

    exec(compile(code, "README.md", "exec"), namespace)

    metrics, server = namespace["metrics"], namespace["server"]
    assert metrics.closed and server.closed
    samples = parse(generate_latest(metrics.registry).decode())  # unregistered on close: nothing of ours is left
    assert not [name for name, _ in samples if name.startswith("kvbm_")]


# ---- switched off ------------------------------------------------------------------------------------------------


def test_importing_the_metrics_and_recording_imports_no_prometheus_client() -> None:
    # prometheus_client costs ~0.1 s to import: paid on the first registry, scrape or serve, not by `import`
    code = """
import sys
from kvbm_builder import Tier
from kvbm_builder.metrics import NullKvbmMetrics
NullKvbmMetrics().record_skipped(Tier.G2, "filter")
print(sorted(name for name in sys.modules if name.startswith("prometheus_client")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)

    assert done.stdout.strip() == "[]"


def test_metrics_switched_off_accept_every_call_and_do_nothing() -> None:
    null = NullKvbmMetrics()

    null.record_transfer(G1, G2, 1, BLOCK, 0.001, True)
    null.record_skipped(G3, "filter")
    null.record_lookup(16, {G2: 16})
    null.set_allocated_bytes(G1, BLOCK)
    null.set_block_counts_source(lambda: {})
    assert null.serve() is None  # no port opened, not even 6880
    null.close()
    assert not null.enabled and KvbmMetrics.enabled


def test_the_null_metrics_have_every_method_of_the_real_ones_with_the_same_parameters() -> None:
    public = [name for name, member in vars(KvbmMetrics).items() if callable(member) and not name.startswith("_")]

    assert public  # the comparison below compares something
    for name in public:
        real, null = inspect.signature(getattr(KvbmMetrics, name)), inspect.signature(getattr(NullKvbmMetrics, name))
        assert list(real.parameters.values()) == list(null.parameters.values()), name
