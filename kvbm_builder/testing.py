"""Fakes for testing code that uses kvbm_builder: real allocators that record or fail, and an event manager
that keeps what it is told.

They are small and real (a :class:`RecordingAllocator` makes real memory through the storage layer), so a test
that uses them checks what production code does::

    from kvbm_builder import KvBlockManager, SystemAllocator
    from kvbm_builder.testing import FailingAllocator, RecordingAllocator

    host = RecordingAllocator(SystemAllocator())
    ...  # build a config whose host tier uses `host`, bring a manager up and close it
    assert host.made and all(storage.closed for storage in host.made)
"""

from __future__ import annotations

import threading
from typing import Any

import attrs

from .config.allocators import BuiltinAllocator
from .config.protocols import Storage, StorageAllocator, StorageKind
from .storage import allocate

__all__ = ["FailingAllocator", "RecordingAllocator", "RecordingEventManager"]


@attrs.define
class RecordingAllocator:
    """Allocates through ``inner`` (a built-in allocator or one of your own) and keeps every storage it made in
    ``made``, so a test can check that each was released (``storage.closed``)."""

    inner: BuiltinAllocator | StorageAllocator
    made: list[Storage] = attrs.field(factory=list)

    @property
    def storage_kind(self) -> StorageKind:
        return self.inner.storage_kind

    def allocate(self, size: int) -> Storage:
        storage = allocate(self.inner, size)
        self.made.append(storage)
        return storage


@attrs.define
class FailingAllocator:
    """Allocates through ``inner`` until call number ``fail_at`` (1 = the first), which raises ``error`` instead,
    as a full disk or a lost GPU would; ``calls`` counts the calls and ``made`` keeps what was allocated before."""

    inner: BuiltinAllocator | StorageAllocator
    fail_at: int = 1
    error: BaseException = attrs.field(factory=lambda: OSError(28, "No space left on device"))
    calls: int = 0
    made: list[Storage] = attrs.field(factory=list)

    @property
    def storage_kind(self) -> StorageKind:
        return self.inner.storage_kind

    def allocate(self, size: int) -> Storage:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        storage = allocate(self.inner, size)
        self.made.append(storage)
        return storage


class RecordingEventManager:
    """An event manager that keeps every ``(kind, event)`` pair it is told, ``kind`` being ``"store"`` or
    ``"remove"``, in arrival order; any event type is accepted. Safe to call from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[str, Any]] = []

    def on_store(self, event: Any) -> None:
        with self._lock:
            self._events.append(("store", event))

    def on_remove(self, event: Any) -> None:
        with self._lock:
            self._events.append(("remove", event))

    @property
    def events(self) -> list[tuple[str, Any]]:
        """A copy of every ``(kind, event)`` so far."""
        with self._lock:
            return list(self._events)

    def stored(self) -> list[Any]:
        return [event for kind, event in self.events if kind == "store"]

    def removed(self) -> list[Any]:
        return [event for kind, event in self.events if kind == "remove"]

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
