"""Objects a caller hands to the config that are not config: memory allocated elsewhere, a filter, an event sink.

The config only duck-types them (``kind``/``addr``/``size``, ``should_offload``, ``on_store``/``on_remove``).
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class Region:
    """Memory the caller allocated elsewhere, as the config sees it (kind, addr, size; never touched)."""

    kind: Any
    addr: int
    size: int


class SeenTwice:
    """An offload filter: offload a block the second time its hash is seen."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def should_offload(self, sequence_hash: int) -> bool:
        if sequence_hash in self.seen:
            return True
        self.seen.add(sequence_hash)
        return False


class EventLog:
    """An event manager that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def on_store(self, event: object) -> None:
        self.events.append(("store", event))

    def on_remove(self, event: object) -> None:
        self.events.append(("remove", event))


class Agent:
    """What the config knows of a caller's NIXL agent: an object with the calls registration makes. The config
    never calls them (the manager's NIXL tests use a real agent)."""

    name = "worker-7"

    def register_memory(self, descs: object, backends: object = None) -> None:
        raise AssertionError("the configuration never registers memory")

    def deregister_memory(self, descs: object, backends: object = None) -> None:
        raise AssertionError("the configuration never deregisters memory")

    def get_reg_descs(self, descs: object, mem_type: object) -> None:
        raise AssertionError("the configuration never builds descriptors")
