"""FrequencyFilter by example, and against a model: a hash must be seen twice before its block goes to disk."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbm_builder.blocks import FrequencyFilter
from kvbm_builder.config.protocols import OffloadFilter
from kvbm_builder.config.runtime import CancellationToken
from kvbm_builder.errors import ConfigError


def wait_until(condition: object, what: str) -> None:
    """Wait for a background thread's effect (a generous cap, so a stuck thread fails instead of hanging)."""
    deadline = time.monotonic() + 30
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.001)


def test_the_defaults_are_upstreams_and_it_is_an_offload_filter() -> None:
    f = FrequencyFilter()
    assert (f.min_offload_frequency, f.flush_interval, f.max_num_entries) == (2, 600.0, 1_000_000)
    assert isinstance(f, OffloadFilter)


def test_a_block_is_offloaded_from_its_second_sighting() -> None:
    f = FrequencyFilter()
    assert f.should_offload(42) is False  # count 1
    assert f.should_offload(42) is True  # count 2
    assert f.should_offload(42) is True  # count 4
    assert f.count(42) == 4


def test_a_tick_decrements_every_count_and_forgets_the_zeros() -> None:
    f = FrequencyFilter()
    f.should_offload(1)
    for _ in range(3):
        f.should_offload(2)  # 1, 2, 4
    f.tick()
    assert (f.count(1), f.count(2), len(f)) == (0, 3, 1)
    assert f.should_offload(1) is False  # forgotten: seen once again


def test_past_max_entries_it_decays_until_it_fits() -> None:
    f = FrequencyFilter(max_num_entries=3)
    for h in (1, 2, 2, 3, 3, 3):
        f.should_offload(h)  # counts 1: 1, 2: 2, 3: 4
    f.should_offload(4)  # 4 entries > 3: one decay drops 1 and 4 (both at 1)
    assert {h: f.count(h) for h in (1, 2, 3, 4)} == {1: 0, 2: 1, 3: 3, 4: 0}
    assert f.ticks == 1


def test_a_higher_minimum_needs_more_sightings() -> None:
    f = FrequencyFilter(min_offload_frequency=8)
    assert [f.should_offload(5) for _ in range(5)] == [False, False, False, True, True]  # 1, 2, 4, 8, 16


def test_bad_parameters_name_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        FrequencyFilter(min_offload_frequency=0, flush_interval=float("nan"), max_num_entries=True)
    assert [path for path, _ in caught.value.errors] == [
        "FrequencyFilter.min_offload_frequency",
        "FrequencyFilter.max_num_entries",
        "FrequencyFilter.flush_interval",
    ]


def test_ticking_starts_with_a_tick_and_stops_without_leaving_a_thread() -> None:
    f = FrequencyFilter(flush_interval=3600)
    f.should_offload(7)
    with f.start():
        assert f.running
        assert (f.ticks, f.count(7)) == (1, 0)  # ticked before start() returned
    assert not f.running
    assert not [t for t in threading.enumerate() if t.name == "kvbm-frequency-filter"]


def test_ticking_repeats_every_flush_interval() -> None:
    with FrequencyFilter(flush_interval=0.001).start() as f:
        wait_until(lambda: f.ticks >= 3, "three ticks")


def test_cancelling_the_token_stops_the_ticking() -> None:
    token = CancellationToken()
    f = FrequencyFilter(flush_interval=3600).start(token)
    token.cancel()
    assert f.join(timeout=30)
    f.start()  # a stopped filter can tick again
    f.stop()
    f.stop()  # idempotent


def test_starting_twice_is_an_error() -> None:
    with FrequencyFilter(flush_interval=3600).start() as f, pytest.raises(Exception, match="already ticking"):
        f.start()


class FilterModel:
    def __init__(self, minimum: int, max_entries: int) -> None:
        self.counts: dict[int, int] = {}
        self.minimum, self.max_entries = minimum, max_entries

    def see(self, h: int) -> bool:
        self.counts[h] = self.counts[h] * 2 if h in self.counts else 1
        result = self.counts[h] >= self.minimum
        while len(self.counts) > self.max_entries:
            self.tick()
        return result

    def tick(self) -> None:
        self.counts = {h: c - 1 for h, c in self.counts.items() if c - 1 > 0}


@given(
    minimum=st.integers(1, 9),
    max_entries=st.integers(1, 6),
    steps=st.lists(st.one_of(st.integers(0, 9), st.none()), max_size=80),  # None: a tick
)
def test_the_filter_agrees_with_its_model(minimum: int, max_entries: int, steps: list[int | None]) -> None:
    f = FrequencyFilter(min_offload_frequency=minimum, max_num_entries=max_entries)
    model = FilterModel(minimum, max_entries)
    for step in steps:
        if step is None:
            f.tick()
            model.tick()
        else:
            assert f.should_offload(step) == model.see(step)
        assert {h: f.count(h) for h in range(10) if f.count(h)} == model.counts


def test_counts_stop_at_the_largest_i64_where_upstream_would_overflow() -> None:
    f = FrequencyFilter()
    for _ in range(70):
        f.should_offload(3)
    assert f.count(3) == 2**63 - 1
