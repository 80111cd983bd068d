"""The device paths of a manager's metrics: upstream's five block counters, each moved by a real copy through the GPU
tier (G1), scraped over HTTP and checked against the blocks, bytes and tokens moved. Needs a CUDA GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from scraping import Scraper, assert_counted, assert_durations, connection_refused, scrape, series, value

from kvbm_builder import Tier
from kvbm_builder.config.settings import KvbmSettings
from kvbm_builder.transfer import TransferError, TransferRecord
from tests.offload_helpers import block_nbytes, fill_and_register, make_manager
from tests.test_metrics_manager import pool_blocks, tier_blocks
from tests.test_offload import BrokenFd, hashes_of, release

pytestmark = pytest.mark.gpu

G1, G2, G3 = Tier.G1, Tier.G2, Tier.G3
PROMPT = list(range(6000, 6032))  # 8 blocks of 4 tokens
OTHER = list(range(6100, 6108))  # 2 more


def test_every_device_path_counts_under_upstreams_name(tmp_path: Path) -> None:
    records: list[TransferRecord] = []
    settings = KvbmSettings(disk_offload_filter=False)
    manager = make_manager(tmp_path, device=16, host=16, disk=24, pinned=True, settings=settings)
    manager.add_listener(lambda event: records.append(event) if isinstance(event, TransferRecord) else None)
    server = manager.serve_metrics(port=0)
    block = block_nbytes(manager)
    scraper = Scraper(server.url)
    scraper.start()
    for tier in (G1, G2, G3):
        assert value(scrape(server.url), "kvbm_tier_allocated_bytes", tier=tier.name) == manager.tier(tier).nbytes

    # device -> host (kvbm_offload_blocks_d2h); the host copies go on to the disk (kvbm_offload_blocks_h2d)
    held = fill_and_register(manager, G1, PROMPT)
    assert len(manager.offload_sync(held).offloaded) == 8
    manager.wait_idle()
    release(held)
    moved = {(G1, G2): 8, (G2, G3): 8}
    assert_counted(scrape(server.url), block_bytes=block, moved=moved)

    # the GPU emptied: the host holds the prompt; host -> device (kvbm_onboard_blocks_h2d)
    manager.pool(G1).reset_inactive()
    with manager.match(PROMPT) as found:
        assert (len(found.device), len(found.host)) == (0, 8)
        release(manager.onboard_sync(found.host))
    moved[(G2, G1)] = 8

    # the GPU and the host emptied: disk -> device (kvbm_onboard_blocks_d2d)
    manager.pool(G1).reset_inactive()
    manager.pool(G2).reset_inactive()
    with manager.match(PROMPT) as found:
        assert (len(found.device), len(found.host), len(found.disk)) == (0, 0, 8)
        release(manager.onboard_sync(found.disk))
    moved[(G3, G1)] = 8

    # device straight to disk (kvbm_offload_blocks_d2d), as when the CPU cache is bypassed
    other = fill_and_register(manager, G1, OTHER)
    assert manager.offload_sync(other, to=G3).dst_tier is G3
    release(other)
    moved[(G1, G3)] = 2

    # a lookup the device answers whole: counted, and out of upstream's hit-rate window
    manager.match(PROMPT).release()
    samples = scrape(server.url)
    lookups = {"requested_tokens": 3 * 32, "matched_tokens": {G1: 32, G2: 32, G3: 32}}
    assert_counted(samples, block_bytes=block, moved=moved, **lookups)
    assert value(samples, "kvbm_host_cache_hit_rate") == value(samples, "kvbm_disk_cache_hit_rate") == 0.5
    assert_durations(samples, records)
    assert tier_blocks(samples) == pool_blocks(manager)

    # a disk -> device copy that fails (the disk's descriptor swapped for a write-only one): failed, not moved
    manager.pool(G1).reset_inactive()
    on_disk = manager.pool(G3).match(hashes_of(manager, OTHER))  # straight from the pool: no lookup counted
    with BrokenFd(manager.tier(G3).storages[0], os.O_WRONLY), pytest.raises(TransferError):
        manager.onboard_sync(on_disk)
    release(on_disk)
    failed = scrape(server.url)
    assert_counted(failed, block_bytes=block, moved=moved, failed={(G3, G1): 1}, **lookups)
    assert_durations(failed, records)

    scrapes = scraper.stop()
    for (name, labels), final in failed.items():
        if name.endswith(("_total", "_count", "_bucket")):
            seen = [s[(name, labels)] for s in scrapes if (name, labels) in s]
            assert seen == sorted(seen) and all(v <= final for v in seen), name
    manager.close()
    assert connection_refused(server.url)


def test_without_a_host_tier_the_gpu_offloads_to_disk_under_d2d(tmp_path: Path) -> None:
    with make_manager(tmp_path, device=8, host=0, disk=16) as manager:
        url = manager.serve_metrics(port=0).url
        held = fill_and_register(manager, G1, PROMPT[:16])
        manager.offload_sync(held)
        release(held)
        samples = scrape(url)
        assert_counted(samples, block_bytes=block_nbytes(manager), moved={(G1, G3): 4})
        assert {dict(k)["tier"] for k in series(samples, "kvbm_tier_blocks")} == {"G1", "G3"}
