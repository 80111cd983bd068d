"""A block manager's metrics, by example: a real round trip between a system-memory host tier (G2) and a real disk
tier (G3), scraped over HTTP from the manager's own /metrics while and after it runs, every number checked against
the blocks, bytes and tokens the test moved and looked up. The device paths are in ``test_metrics_gpu.py``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from scraping import (
    Samples,
    Scraper,
    assert_counted,
    assert_durations,
    connection_refused,
    free_port,
    parse,
    scrape,
    series,
    value,
)

from kvbm_builder import DiskAllocator, KvBlockManager, KvManagerRuntimeConfig, SystemAllocator, Tier
from kvbm_builder.blocks import FrequencyFilter
from kvbm_builder.config.settings import KvbmSettings
from kvbm_builder.errors import ConfigError, MetricsError, MetricsRegistryError, MetricsServerError
from kvbm_builder.metrics import DEFAULT_CACHE_STATS_MAX_REQUESTS, KvbmMetrics, NullKvbmMetrics
from kvbm_builder.offload import OffloadSkipped
from kvbm_builder.testing import FailingAllocator
from kvbm_builder.transfer import TransferError, TransferRecord
from tests.offload_helpers import MODEL, block_nbytes, fill_and_register, make_manager, tier_config
from tests.test_offload import BrokenFd, release

G2, G3 = Tier.G2, Tier.G3
PROMPT = list(range(7000, 7032))  # 8 blocks of 4 tokens
LONGER = [*PROMPT, *range(9000, 9008)]  # the prompt and 2 blocks nobody holds
OTHER = list(range(8000, 8008))  # 2 more blocks


def tier_blocks(samples: Samples) -> dict[tuple[str, str], float]:
    """kvbm_tier_blocks as {(tier, state): blocks}."""
    return {(dict(k)["tier"], dict(k)["state"]): v for k, v in series(samples, "kvbm_tier_blocks").items()}


def pool_blocks(manager: KvBlockManager) -> dict[tuple[str, str], float]:
    """What the pools say now, in the same form."""
    return {
        (tier.name, state): getattr(counts, state)
        for tier, counts in manager.stats().blocks.items()
        for state in ("free", "active", "inactive")
    }


def kvbm_names(registry: CollectorRegistry) -> list[str]:
    return [name for name, _ in parse(generate_latest(registry).decode()) if name.startswith("kvbm_")]


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[KvBlockManager]:
    # the host tier's filter lets a block through to the disk on its second offer, as upstream's default does
    with make_manager(tmp_path, host=8, disk=6, host_filter=FrequencyFilter()) as manager:
        yield manager


# ---- the round trip ----------------------------------------------------------------------------------------------


def test_a_round_trip_scraped_over_http_moves_every_metric_by_what_moved(tmp_path: Path) -> None:
    records: list[TransferRecord] = []
    with make_manager(tmp_path, host=8, disk=6, host_filter=FrequencyFilter()) as manager:
        manager.add_listener(lambda event: records.append(event) if isinstance(event, TransferRecord) else None)
        server = manager.serve_metrics(port=0)  # the manager's own metrics, on runtime.metrics_registry
        block = block_nbytes(manager)
        assert server.url.startswith("http://127.0.0.1:")
        scraper = Scraper(server.url)  # scrapes all along, while blocks move
        scraper.start()

        # 0. nothing counted yet; the tiers' bytes and free blocks are there
        before = scrape(server.url)
        assert_counted(before, block_bytes=block)
        assert_durations(before, [])
        for tier in (G2, G3):
            assert value(before, "kvbm_tier_allocated_bytes", tier=tier.name) == manager.tier(tier).nbytes > 0
        assert tier_blocks(before) == {
            **{("G2", s): n for s, n in (("free", 8), ("active", 0), ("inactive", 0))},
            **{("G3", s): n for s, n in (("free", 6), ("active", 0), ("inactive", 0))},
        }
        assert value(before, "kvbm_host_cache_hit_rate") == value(before, "kvbm_disk_cache_hit_rate") == 0

        # 1. 8 blocks written in the host tier, offered to the disk: the filter has seen none of them before
        held = fill_and_register(manager, G2, PROMPT)
        assert len(manager.offload_sync(held).filtered) == 8
        filtered = scrape(server.url)
        assert_counted(filtered, block_bytes=block, skipped={(G3, "filter"): 8})
        assert tier_blocks(filtered)[("G2", "active")] == 8

        # 2. offered again: 6 fit on the disk, 2 find it full
        result = manager.offload_sync(held)
        assert (len(result.offloaded), len(result.target_full)) == (6, 2)
        offloaded = scrape(server.url)
        assert_counted(
            offloaded, block_bytes=block, moved={(G2, G3): 6}, skipped={(G3, "filter"): 8, (G3, "tier_full"): 2}
        )
        assert_durations(offloaded, records)
        assert tier_blocks(offloaded) == pool_blocks(manager)
        assert tier_blocks(offloaded)[("G3", "inactive")] == 6  # registered on the disk, held by nobody

        # 3. a lookup while the host tier holds the whole prompt: 32 of 32 tokens from the host
        manager.match(PROMPT).release()
        # 4. the host tier emptied: 24 of 40 tokens from the disk
        release(held)
        manager.pool(G2).reset_inactive()
        found = manager.match(LONGER)
        assert (len(found.host), len(found.disk)) == (0, 6)
        looked_up = scrape(server.url)
        skips = {(G3, "filter"): 8, (G3, "tier_full"): 2}
        assert_counted(
            looked_up,
            block_bytes=block,
            moved={(G2, G3): 6},
            skipped=skips,
            requested_tokens=32 + 40,
            matched_tokens={G2: 32, G3: 24},
        )
        assert value(looked_up, "kvbm_host_cache_hit_rate") == 32 / 72
        assert value(looked_up, "kvbm_disk_cache_hit_rate") == 24 / 72

        # 5. onboard the 6 disk blocks into the host tier
        back = manager.onboard_sync(found.disk, to=G2)
        found.release()
        onboarded = scrape(server.url)
        moved = {(G2, G3): 6, (G3, G2): 6}
        lookups: dict[str, Any] = {"requested_tokens": 72, "matched_tokens": {G2: 32, G3: 24}}
        assert_counted(onboarded, block_bytes=block, moved=moved, skipped=skips, **lookups)
        assert tier_blocks(onboarded)[("G2", "active")] == 6
        release(back)

        # 6. a disk write that fails (its descriptor swapped for a read-only one): a failure, nothing moved
        other = fill_and_register(manager, G2, OTHER)
        manager.offload_sync(other)  # first sighting: filtered
        with BrokenFd(manager.tier(G3).storages[0], os.O_RDONLY), pytest.raises(TransferError):
            manager.offload_sync(other)
        release(other)
        failed = scrape(server.url)
        skips[(G3, "filter")] += 2
        assert_counted(failed, block_bytes=block, moved=moved, failed={(G2, G3): 1}, skipped=skips, **lookups)
        assert_durations(failed, records)  # the failed transfer is in no histogram
        assert sum(not r.ok for r in records) == 1
        stats = manager.stats()  # the manager's own counts agree with the scrape
        assert stats.moved_blocks == moved and stats.failed_transfers == {(G2, G3): 1}
        assert stats.moved_bytes == {path: n * block for path, n in moved.items()}
        assert tier_blocks(failed) == pool_blocks(manager)

        # scraped all along: every scrape was whole, and no counter ever went back or past its final value
        scrapes = scraper.stop()
        assert len(scrapes) >= 2
        for (name, labels), final in failed.items():
            if name.endswith(("_total", "_count", "_sum", "_bucket")):
                seen = [s[(name, labels)] for s in scrapes if (name, labels) in s]
                assert seen == sorted(seen) and all(v <= final for v in seen), name

        # 7. closed with the manager: the endpoint is gone and the names are off the runtime config's registry
        registry = manager.metrics_registry
        metrics = manager.metrics
        assert kvbm_names(registry)
        manager.close()  # as the with block would
        assert server.closed and metrics.closed and manager.metrics_server is None
        assert connection_refused(server.url)
        assert kvbm_names(registry) == []


def test_a_transfer_is_counted_when_it_completes_not_when_it_is_queued(tmp_path: Path) -> None:
    # one block per transfer, one copying at a time (and one more waiting in the engine): the third block waits in
    # the manager's queue until a transfer before it is settled
    settings = KvbmSettings(disk_offload_filter=False, max_transfer_batch_size=1, max_concurrent_transfers=1)
    with make_manager(tmp_path, host=8, disk=8, settings=settings) as manager:
        url = manager.serve_metrics(port=0).url
        first, scraped = threading.Lock(), threading.Event()
        at_completion: list[Samples] = []

        def on_completion(event: object) -> None:  # the metrics counted the transfer; it is not settled yet
            if not isinstance(event, TransferRecord):
                return
            if first.acquire(blocking=False):
                at_completion.append(scrape(url))  # the first copy (perhaps the second too) landed
                scraped.set()
            else:
                scraped.wait(60)  # no later transfer is settled (so the third is not submitted) until then

        manager.add_listener(on_completion)
        held = fill_and_register(manager, G2, PROMPT[:12])
        future = manager.offload(held)
        assert len(future.result(timeout=60).offloaded) == 3
        block = block_nbytes(manager)
        moved = value(at_completion[0], "kvbm_offload_blocks_h2d")
        assert moved in (1, 2)  # never 3: the third was queued, not copied, when the first completed
        assert_counted(at_completion[0], block_bytes=block, moved={(G2, G3): moved})
        assert_counted(scrape(url), block_bytes=block, moved={(G2, G3): 3})
        release(held)


def test_a_scrape_that_stalls_holds_up_no_transfer_and_no_other_scrape(manager: KvBlockManager) -> None:
    url = manager.serve_metrics(port=0).url
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as stalled:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never finishes its request
        held = fill_and_register(manager, G2, PROMPT)
        manager.offload_sync(held)
        assert len(manager.offload_sync(held).offloaded) == 6
        release(held)
        assert value(scrape(url), "kvbm_offload_blocks_h2d") == 6


def test_the_hit_rate_window_is_the_settings_one(tmp_path: Path) -> None:
    assert KvbmSettings().cache_stats_max_requests == DEFAULT_CACHE_STATS_MAX_REQUESTS  # one default for both
    with make_manager(tmp_path, settings=KvbmSettings(cache_stats_max_requests=2)) as manager:
        assert manager.metrics.cache_stats_max_requests == 2
        held = fill_and_register(manager, G2, PROMPT[:8])
        manager.match(PROMPT[:8]).release()  # 8 of 8 from the host: out of the window after two more
        manager.match(OTHER).release()  # 0 of 8
        manager.match(OTHER).release()  # 0 of 8
        samples = scrape(manager.serve_metrics(port=0).url)
        assert value(samples, "kvbm_host_cache_hit_rate") == 0
        assert value(samples, "kvbm_tier_matched_tokens_total", tier="G2") == 8  # counters keep everything
        release(held)


# ---- serving: DYN_KVBM_METRICS, the port, bring-up failures --------------------------------------------------


def test_dyn_kvbm_metrics_serves_on_dyn_kvbm_metrics_port_at_bring_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("DYN_KVBM_METRICS", "true")
    monkeypatch.setenv("DYN_KVBM_METRICS_PORT", str(port))
    monkeypatch.setenv("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "1")
    from kvbm_builder.loading import settings_from_env

    with make_manager(tmp_path, settings=settings_from_env()) as manager:
        server = manager.metrics_server
        assert server is not None and server.url == f"http://127.0.0.1:{port}/metrics"
        held = fill_and_register(manager, G2, PROMPT[:8])
        manager.offload_sync(held)
        assert value(scrape(server.url), "kvbm_offload_blocks_h2d") == 2
        with pytest.raises(MetricsError, match=r"already serves its metrics at http://127\.0\.0\.1"):
            manager.serve_metrics(port=0)
        release(held)
    assert connection_refused(server.url)


def test_no_endpoint_unless_asked(manager: KvBlockManager) -> None:
    assert not manager.settings.metrics and manager.metrics_server is None
    assert manager.metrics.enabled  # counted all the same, on the runtime config's registry
    assert "kvbm_offload_blocks_h2d" in kvbm_names(manager.metrics_registry)


def test_a_port_in_use_fails_the_bring_up_naming_the_variable_and_releases_everything(tmp_path: Path) -> None:
    runtime = KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = KvbmSettings(metrics=True, metrics_port=port)

        with pytest.raises(MetricsServerError) as caught:
            make_manager(tmp_path, runtime=runtime, settings=settings)

    assert "DYN_KVBM_METRICS_PORT" in str(caught.value) and f"127.0.0.1:{port}" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # no disk tier file left
    assert kvbm_names(runtime.metrics_registry) == []  # the names are free: the next manager comes up
    with make_manager(tmp_path, runtime=runtime) as manager:
        assert manager.metrics.enabled


def test_a_bring_up_that_fails_after_serving_closes_the_endpoint(tmp_path: Path) -> None:
    port = free_port()
    runtime = KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build()
    disk = FailingAllocator(DiskAllocator(directory=str(tmp_path)))
    config = (
        KvBlockManager.builder()
        .runtime(runtime)
        .model(MODEL)
        .host_layout(tier_config(8, SystemAllocator()))
        .disk_layout(tier_config(8, disk))
        .build_config()
    )

    with pytest.raises(Exception, match="No space left on device"):
        KvBlockManager(config, settings=KvbmSettings(metrics=True, metrics_port=port))

    assert disk.calls == 1
    assert connection_refused(f"http://127.0.0.1:{port}/metrics")
    assert kvbm_names(runtime.metrics_registry) == []


def test_another_address_only_when_asked(manager: KvBlockManager) -> None:
    import inspect

    assert inspect.signature(KvBlockManager.serve_metrics).parameters["host"].default == "127.0.0.1"
    try:
        server = manager.serve_metrics(port=0, host="::1")
    except MetricsServerError as err:
        pytest.skip(f"::1 cannot be bound here: {err}")
    assert server.url.startswith("http://[::1]:")
    assert value(scrape(server.url), "kvbm_offload_blocks_d2h") == 0


# ---- the registry, the config's kvbm_metrics, metrics switched off ------------------------------------------


def test_two_open_managers_on_one_registry_is_a_clear_error(tmp_path: Path) -> None:
    runtime = KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build()  # one registry for both
    with make_manager(tmp_path, runtime=runtime) as first:
        files = sorted(tmp_path.rglob("*"))

        with pytest.raises(MetricsRegistryError) as caught:
            make_manager(tmp_path, runtime=runtime)

        message = str(caught.value)
        assert "runtime.metrics_registry" in message and "kvbm_" in message and "own KvManagerRuntimeConfig" in message
        assert sorted(tmp_path.rglob("*")) == files  # the second allocated nothing
        held = fill_and_register(first, G2, PROMPT[:8])  # the first one still counts
        first.offload_sync(held)
        assert runtime.metrics_registry.get_sample_value("kvbm_offload_blocks_h2d_total") == 2
        release(held)


def test_the_configs_kvbm_metrics_are_used_and_left_open(tmp_path: Path) -> None:
    with KvbmMetrics(CollectorRegistry(), cache_stats_max_requests=5) as metrics:
        with make_manager(tmp_path, kvbm_metrics=metrics) as manager:
            assert manager.metrics is metrics
            server = manager.serve_metrics(port=0)
            held = fill_and_register(manager, G2, PROMPT[:8])
            manager.offload_sync(held)
            release(held)
            assert value(scrape(server.url), "kvbm_tier_allocated_bytes", tier="G3") == manager.tier(G3).nbytes
            with pytest.raises(MetricsError, match="another KvBlockManager that is open"):
                make_manager(tmp_path, kvbm_metrics=metrics)
        # the manager closed its endpoint and its part; the metrics are the caller's, and keep what was counted
        assert connection_refused(server.url) and not metrics.closed
        samples = parse(generate_latest(metrics.registry).decode())
        assert value(samples, "kvbm_offload_blocks_h2d") == 2
        assert value(samples, "kvbm_tier_allocated_bytes", tier="G3") == 0
        assert series(samples, "kvbm_tier_blocks") == {}  # no pools any more
        with make_manager(tmp_path, kvbm_metrics=metrics) as after:  # free for the next manager
            assert after.metrics is metrics
    with pytest.raises(MetricsError, match="kvbm_metrics: these KvbmMetrics were closed"):
        make_manager(tmp_path, kvbm_metrics=metrics)


@pytest.mark.parametrize("wrong", [object(), CollectorRegistry(), "metrics", 1])
def test_the_kvbm_metrics_field_takes_kvbm_metrics_and_nothing_else(wrong: object) -> None:
    builder = (
        KvBlockManager.builder()
        .runtime(KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build())
        .model(MODEL)
    )

    with pytest.raises(ConfigError) as caught:
        builder.kvbm_metrics(wrong).build_config()  # type: ignore[arg-type]

    assert [p.path for p in caught.value.problems] == [("kvbm_metrics",)]
    assert "must be a kvbm_builder.metrics.KvbmMetrics (or NullKvbmMetrics" in str(caught.value)


def test_metrics_switched_off_count_nothing_and_serve_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    runtime = KvManagerRuntimeConfig.builder().worker_id(0).disable_nixl().build()
    settings = KvbmSettings(metrics=True, metrics_port=port, disk_offload_filter=False)

    with caplog.at_level(logging.WARNING, "kvbm_builder.manager"):
        manager = make_manager(tmp_path, runtime=runtime, settings=settings, kvbm_metrics=NullKvbmMetrics())
    with manager:
        held = fill_and_register(manager, G2, PROMPT[:8])
        assert len(manager.offload_sync(held).offloaded) == 2  # the manager works as ever
        release(held)
        assert not manager.metrics.enabled and manager.metrics_server is None
        assert connection_refused(f"http://127.0.0.1:{port}/metrics")
        assert kvbm_names(runtime.metrics_registry) == []
        with pytest.raises(MetricsError, match="counts nothing"):
            manager.serve_metrics(port=0)
    assert "DYN_KVBM_METRICS asks for /metrics" in caplog.text


def test_skips_the_metrics_do_not_count_are_those_that_need_no_copy(manager: KvBlockManager) -> None:
    skipped: list[OffloadSkipped] = []
    manager.add_listener(lambda event: skipped.append(event) if isinstance(event, OffloadSkipped) else None)
    url = manager.serve_metrics(port=0).url
    held = fill_and_register(manager, G2, PROMPT[:8])
    manager.offload_sync(held)  # filtered
    manager.offload_sync(held)  # copied
    manager.offload_sync(held)  # already present on the disk: nothing lost, nothing counted
    release(held)

    assert [s.reason.value for s in skipped] == ["filtered"] * 2 + ["already_present"] * 2
    assert_counted(scrape(url), block_bytes=block_nbytes(manager), moved={(G2, G3): 2}, skipped={(G3, "filter"): 2})


# ---- the example -------------------------------------------------------------------------------------------------


def test_the_example_prints_what_each_step_moved_and_closes_the_endpoint(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "metrics.py"
    done = subprocess.run(
        [sys.executable, str(example), "--blocks", "2", "--disk-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr
    out = done.stdout
    # with a GPU the first offload is device -> host (d2h), without one host -> disk (h2d): 2 blocks either way
    assert re.search(r"^  kvbm_offload_blocks_(d2h|h2d) +0\.0 -> 2\.0$", out, re.MULTILINE), out
    assert re.search(r"^  kvbm_disk_cache_hit_rate +0\.0 -> 1\.0$", out, re.MULTILINE), out
    assert "closed with the manager" in out and "Connection refused" in out
    assert list(tmp_path.iterdir()) == []
