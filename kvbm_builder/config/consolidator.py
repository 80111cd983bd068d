"""``KvEventConsolidatorConfig``: deduplicating KV events of the engine (G1) and KVBM (G2/G3)."""

from __future__ import annotations

import enum
from typing import ClassVar

import attrs

from ..errors import ConfigError, Problem, show
from ._builder import Builder
from .fields import Validated, endpoint, field, spelled
from .names import name_key

DEFAULT_ENGINE_EVENT_ENDPOINT = "tcp://localhost:5557"
DEFAULT_CONSOLIDATED_EVENT_ENDPOINT = "tcp://*:5558"


class EventSource(enum.Enum):
    """Who publishes the events the consolidator reads."""

    Vllm = "vllm"
    Trtllm = "trtllm"
    Kvbm = "kvbm"

    @classmethod
    def parse(cls, value: object) -> EventSource:
        """Case-insensitive: ``vllm``/``gpu``, ``trtllm``/``tensorrt-llm``/``tensorrt_llm``, ``kvbm``."""
        if isinstance(value, EventSource):
            return value
        found = _SOURCE_NAMES.get(name_key(value, trim=True, dash=True) or "")
        if found is not None:
            return found
        raise ConfigError(
            [Problem((), f"must be an event source (vllm, gpu, trtllm, tensorrt-llm, kvbm), got {show(value)}")]
        )


_SOURCE_NAMES = {
    "vllm": EventSource.Vllm,
    "gpu": EventSource.Vllm,
    "trtllm": EventSource.Trtllm,
    "tensorrt-llm": EventSource.Trtllm,
    "kvbm": EventSource.Kvbm,
}


class ConsolidatorMode(enum.Enum):
    dedup = "dedup"
    passthrough = "passthrough"

    @classmethod
    def parse(cls, value: object) -> ConsolidatorMode:
        if isinstance(value, ConsolidatorMode):
            return value
        key = name_key(value, trim=True)
        if key in ("dedup", "passthrough"):
            return cls(key)
        raise ConfigError([Problem((), f"must be 'dedup' or 'passthrough', got {show(value)}")])


@attrs.frozen(kw_only=True)
class KvEventConsolidatorConfig(Validated):
    """Where the engine publishes its events, where consolidated events go, who the engine is."""

    _kvbm_root: ClassVar[str] = "consolidator_config"

    engine_event_endpoint: str = field(
        default=DEFAULT_ENGINE_EVENT_ENDPOINT, rule=endpoint, doc="Where the engine publishes its KV events."
    )
    consolidated_event_endpoint: str = field(
        default=DEFAULT_CONSOLIDATED_EVENT_ENDPOINT, rule=endpoint, doc="Where consolidated events are published."
    )
    engine_source: EventSource = field(
        default=EventSource.Vllm,
        **spelled(EventSource.parse, EventSource, names=(("vllm", "gpu", "trtllm", "tensorrt-llm"), "trim-dash")),
        doc="Who publishes the engine events: vllm (or gpu), trtllm (or tensorrt-llm); case-insensitive.",
    )
    mode: ConsolidatorMode = field(
        default=ConsolidatorMode.dedup,
        **spelled(ConsolidatorMode.parse, ConsolidatorMode, names=(("dedup", "passthrough"), "trim")),
        doc="dedup or passthrough.",
    )

    @classmethod
    def new_vllm(cls, engine_event_endpoint: str, consolidated_event_endpoint: str) -> KvEventConsolidatorConfig:
        return cls(
            engine_event_endpoint=engine_event_endpoint,
            consolidated_event_endpoint=consolidated_event_endpoint,
            engine_source=EventSource.Vllm,
        )

    @classmethod
    def new_trtllm(cls, engine_event_endpoint: str, consolidated_event_endpoint: str) -> KvEventConsolidatorConfig:
        return cls(
            engine_event_endpoint=engine_event_endpoint,
            consolidated_event_endpoint=consolidated_event_endpoint,
            engine_source=EventSource.Trtllm,
        )

    @staticmethod
    def builder() -> KvEventConsolidatorConfigBuilder:
        return KvEventConsolidatorConfigBuilder()


class KvEventConsolidatorConfigBuilder(Builder[KvEventConsolidatorConfig]):
    _target = KvEventConsolidatorConfig

    def engine_event_endpoint(self, value: str) -> KvEventConsolidatorConfigBuilder:
        return self._set("engine_event_endpoint", value)

    def consolidated_event_endpoint(self, value: str) -> KvEventConsolidatorConfigBuilder:
        return self._set("consolidated_event_endpoint", value)

    def engine_source(self, value: EventSource | str) -> KvEventConsolidatorConfigBuilder:
        return self._set("engine_source", value)

    def mode(self, value: ConsolidatorMode | str) -> KvEventConsolidatorConfigBuilder:
        return self._set("mode", value)


def engine_source_problem(source: EventSource) -> Problem | None:
    """The one rule on a manager's consolidator source: Kvbm is never valid there (path relative to the
    consolidator config). Both the manager's custom setter and ``KvBlockManagerConfig`` report it."""
    if source is EventSource.Kvbm:
        return Problem(
            ("engine_source",),
            "Kvbm is not valid here: KVBM's own events reach the consolidator directly, not over ZMQ; "
            "use vllm or trtllm (EventSource.Vllm or EventSource.Trtllm)",
        )
    return None


def consolidator_from_setter(
    engine_endpoint: object, output_endpoint: object, engine_source: object
) -> KvEventConsolidatorConfig | str:
    """Upstream's custom ``consolidator_config(engine_endpoint, output_endpoint, engine_source)`` rules.

    Returns the config, or a message saying why these arguments cannot make one (upstream panics).
    """
    try:
        source = EventSource.parse(engine_source)
    except ConfigError as err:
        return f"engine_source {err.problems[0].message}"
    refused = engine_source_problem(source)
    if refused is not None:
        return f"{refused.path[0]} {refused.message}"
    if output_endpoint is None:
        which = "vLLM" if source is EventSource.Vllm else "TensorRT-LLM (the endpoint the consolidator publishes on)"
        return f"output_endpoint is required for {which}; e.g. 'tcp://*:5558'"
    try:
        return KvEventConsolidatorConfig(
            engine_event_endpoint=engine_endpoint,  # type: ignore[arg-type]
            consolidated_event_endpoint=output_endpoint,  # type: ignore[arg-type]
            engine_source=source,
        )
    except ConfigError as err:
        return "; ".join(f"{p.path[0]} {p.message}" for p in err.problems)
