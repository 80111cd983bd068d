"""Store and remove events: what a cache tier tells the outside world (a router, a consolidator) it holds.

A :class:`StoreEvent` is sent when a (sequence hash, tier) pair gains its first live registration, a
:class:`RemoveEvent` when that registration goes (the block was evicted for another, reset, or its pool closed).
Each pool delivers them, in order, to the config's ``event_manager`` (``on_store(event)`` / ``on_remove(event)``),
on the thread that made the change: a completed transfer registers its blocks on the transfer engine's threads, so an
event manager must be thread-safe. One that raises is logged and counted (``BlockPool.event_failures``); the pool is
unaffected.
"""

from __future__ import annotations

import enum

import attrs

from ..config.protocols import Tier

__all__ = ["BlockEvent", "NullEventManager", "RemoveEvent", "RemoveReason", "StoreEvent"]


class RemoveReason(enum.Enum):
    EVICTED = "evicted"  # its slot was taken for another block
    RESET = "reset"  # the tier's inactive blocks were reset
    CLOSED = "closed"  # the pool (and its memory) went away


@attrs.frozen(kw_only=True)
class BlockEvent:
    """What both events carry: the block's hashes, tokens and size, and where it lives.

    ``tokens`` is empty (and ``local_hash`` None) for a block registered by an engine's own hash.
    """

    sequence_hash: int
    parent_hash: int | None
    tokens: tuple[int, ...]
    block_size: int
    tier: Tier
    block_id: int
    local_hash: int | None = None
    external_hash: int | None = None


@attrs.frozen(kw_only=True)
class StoreEvent(BlockEvent):
    """A tier now holds the block with this sequence hash."""


@attrs.frozen(kw_only=True)
class RemoveEvent(BlockEvent):
    """A tier no longer holds the block with this sequence hash."""

    reason: RemoveReason = RemoveReason.EVICTED


class NullEventManager:
    """An event manager that ignores every event (what a pool uses when the config has none)."""

    def on_store(self, event: object) -> None:
        pass

    def on_remove(self, event: object) -> None:
        pass

    def __repr__(self) -> str:
        return "NullEventManager()"
