"""``FrequencyFilter``: offload a block to the next tier only once it has been seen often enough.

Upstream (``offload/filter.rs``) attaches ``FrequencyFilter(2, 600 s, 1_000_000)`` to the host tier when a disk tier
exists, so a host block must be offered twice before it is written to disk (SSDs wear with every write):

- each sighting of a sequence hash sets its count to 1 if new, else doubles it; offload when count >= the minimum;
- a decay tick decrements every count by one and forgets those that reach 0: the first tick when ticking starts,
  then one every ``flush_interval`` seconds;
- when a sighting makes the map hold more than ``max_num_entries`` hashes, it decays until it fits (and the next
  periodic tick is a full interval later).

Upstream's counts are i64 and overflow after 63 doublings; here they stop at 2**63 - 1.
"""

from __future__ import annotations

import math
import threading
import time
from types import TracebackType

from ..config.runtime import CancellationToken
from ..errors import ConfigError, OffloadError, Problem
from .hashing import _u64

__all__ = ["FrequencyFilter"]

_MAX_COUNT = (1 << 63) - 1


class FrequencyFilter:
    """An offload filter (``should_offload(sequence_hash) -> bool``) that lets through hashes seen often enough.

    It decays only while ticking: :meth:`start` ticks in a background thread until :meth:`stop` (or ``with``'s
    exit) or until the cancellation token it was started with is cancelled; :meth:`tick` decays once, by hand
    (deterministic tests, or callers with their own scheduler). A manager starts the filters of its tiers that are
    not ticking yet, on its own token, and stops them when it closes.
    """

    def __init__(
        self, min_offload_frequency: int = 2, flush_interval: float = 600.0, max_num_entries: int = 1_000_000
    ) -> None:
        problems = []
        for name, value in (("min_offload_frequency", min_offload_frequency), ("max_num_entries", max_num_entries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(Problem((name,), f"must be a whole number >= 1, got {value!r}"))
        if (
            isinstance(flush_interval, bool)
            or not isinstance(flush_interval, (int, float))
            or not math.isfinite(flush_interval)
            or flush_interval <= 0
        ):
            problems.append(Problem(("flush_interval",), f"must be a number of seconds > 0, got {flush_interval!r}"))
        if problems:
            raise ConfigError(problems, "FrequencyFilter")
        self.min_offload_frequency = min_offload_frequency
        self.flush_interval = float(flush_interval)
        self.max_num_entries = max_num_entries
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()
        self._next_tick = math.inf
        self._token: CancellationToken | None = None
        self._thread: threading.Thread | None = None
        self.ticks = 0
        """Decay steps taken so far (periodic, oversize and by hand)."""

    # -- the filter -----------------------------------------------------------------------------------------

    def should_offload(self, sequence_hash: int) -> bool:
        """Record one sighting of ``sequence_hash``; True when its count has reached ``min_offload_frequency``."""
        key = _u64(sequence_hash, "sequence_hash")
        with self._lock:
            count = self._counts.get(key)
            count = 1 if count is None else min(2 * count, _MAX_COUNT)
            self._counts[key] = count
            if len(self._counts) > self.max_num_entries:
                while len(self._counts) > self.max_num_entries:
                    self._decay()
                self._next_tick = time.monotonic() + self.flush_interval
        return count >= self.min_offload_frequency

    def count(self, sequence_hash: int) -> int:
        """The current count of a hash (0 when not tracked)."""
        with self._lock:
            return self._counts.get(_u64(sequence_hash, "sequence_hash"), 0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._counts)

    def tick(self) -> None:
        """One decay step now: every count drops by one; hashes at 0 are forgotten."""
        with self._lock:
            self._decay()

    def _decay(self) -> None:
        self.ticks += 1
        self._counts = {key: count - 1 for key, count in self._counts.items() if count > 1}

    # -- ticking in the background --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a background thread is ticking."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self, cancellation_token: CancellationToken | None = None) -> FrequencyFilter:
        """Tick now (before returning, so a sighting after ``start()`` is never decayed by that first tick), then
        every ``flush_interval`` seconds in a daemon thread, until stopped; returns self.

        Cancelling ``cancellation_token`` stops the thread too. Starting a running filter is an error.
        """
        with self._lock:
            if self.running:
                raise OffloadError("this FrequencyFilter is already ticking; stop() it before starting it again")
            token = cancellation_token.child_token() if cancellation_token is not None else CancellationToken()
            self._token = token
            self._decay()  # the first tick at start, as upstream's interval does
            self._next_tick = time.monotonic() + self.flush_interval
            thread = threading.Thread(target=self._run, args=(token,), name="kvbm-frequency-filter", daemon=True)
            self._thread = thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop the background ticking and wait for its thread to end. Idempotent."""
        with self._lock:
            token, thread = self._token, self._thread
        if token is not None:
            token.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the background thread to end (after its token was cancelled); True when none is running."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return not self.running

    def _run(self, token: CancellationToken) -> None:
        while True:
            with self._lock:
                remaining = self._next_tick - time.monotonic()
                if remaining <= 0:
                    self._decay()
                    self._next_tick = time.monotonic() + self.flush_interval
                    continue
            if token.wait(remaining):
                return

    def __enter__(self) -> FrequencyFilter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"FrequencyFilter(min_offload_frequency={self.min_offload_frequency}, "
            f"flush_interval={self.flush_interval}, max_num_entries={self.max_num_entries})"
        )
