"""KvEventConsolidatorConfig, and KvBlockManagerConfig's custom ``consolidator_config(...)`` setter."""

from __future__ import annotations

import pytest

from kvbm_builder import (
    ConfigError,
    KvBlockManagerConfig,
    KvEventConsolidatorConfig,
    KvManagerModelConfig,
    KvManagerRuntimeConfig,
)
from kvbm_builder.config import ConsolidatorMode, EventSource, KvBlockManagerConfigBuilder

RUNTIME = KvManagerRuntimeConfig.builder().worker_id(0).build()
MODEL = KvManagerModelConfig.builder().num_layers(2).outer_dim(2).page_size(16).inner_dim(128).build()


def manager() -> KvBlockManagerConfigBuilder:
    return KvBlockManagerConfig.builder().runtime(RUNTIME).model(MODEL)


class TestTheConsolidatorConfig:
    def test_defaults(self) -> None:
        config = KvEventConsolidatorConfig.builder().build()

        assert config.engine_event_endpoint == "tcp://localhost:5557"
        assert config.consolidated_event_endpoint == "tcp://*:5558"
        assert config.engine_source is EventSource.Vllm
        assert config.mode is ConsolidatorMode.dedup
        assert config == KvEventConsolidatorConfig()

    def test_every_field_can_be_set(self) -> None:
        config = (
            KvEventConsolidatorConfig.builder()
            .engine_event_endpoint("ipc:///run/engine-events")
            .consolidated_event_endpoint("tcp://0.0.0.0:6000")
            .engine_source(EventSource.Trtllm)
            .mode(ConsolidatorMode.passthrough)
            .build()
        )

        assert config == KvEventConsolidatorConfig(
            engine_event_endpoint="ipc:///run/engine-events",
            consolidated_event_endpoint="tcp://0.0.0.0:6000",
            engine_source=EventSource.Trtllm,
            mode=ConsolidatorMode.passthrough,
        )

    def test_source_and_mode_by_name(self) -> None:
        config = KvEventConsolidatorConfig.builder().engine_source("TensorRT-LLM").mode("Passthrough").build()

        assert config.engine_source is EventSource.Trtllm
        assert config.mode is ConsolidatorMode.passthrough

    def test_the_named_constructors(self) -> None:
        vllm = KvEventConsolidatorConfig.new_vllm("tcp://localhost:5557", "tcp://*:5558")
        trtllm = KvEventConsolidatorConfig.new_trtllm("tcp://localhost:5557", "tcp://*:5558")

        assert vllm.engine_source is EventSource.Vllm
        assert trtllm.engine_source is EventSource.Trtllm

    @pytest.mark.parametrize(
        ("endpoint", "message"),
        [
            ("localhost:5557", "must look like 'tcp://host:port' or 'ipc:///path', got 'localhost:5557'"),
            ("tcp://", "must look like 'tcp://host:port' or 'ipc:///path', got 'tcp://'"),
            ("tcp://local host:1", "must look like 'tcp://host:port' or 'ipc:///path', got 'tcp://local host:1'"),
            (5557, "must be an endpoint string such as 'tcp://localhost:5557', got 5557"),
        ],
    )
    def test_endpoints(self, endpoint: object, message: str) -> None:
        with pytest.raises(ConfigError) as caught:
            KvEventConsolidatorConfig.builder().engine_event_endpoint(endpoint).build()  # type: ignore[arg-type]

        assert caught.value.errors == [("consolidator_config.engine_event_endpoint", message)]

    def test_an_unknown_source_or_mode_is_reported_at_build(self) -> None:
        builder = KvEventConsolidatorConfig.builder().engine_source("sglang").mode("merge")

        with pytest.raises(ConfigError) as caught:
            builder.build()

        assert caught.value.errors == [
            (
                "consolidator_config.engine_source",
                "must be an event source (vllm, gpu, trtllm, tensorrt-llm, kvbm), got 'sglang' (str)",
            ),
            ("consolidator_config.mode", "must be 'dedup' or 'passthrough', got 'merge' (str)"),
        ]


class TestEventSource:
    @pytest.mark.parametrize(
        ("text", "source"),
        [
            ("vllm", EventSource.Vllm),
            ("vLLM", EventSource.Vllm),
            ("gpu", EventSource.Vllm),
            ("trtllm", EventSource.Trtllm),
            ("tensorrt-llm", EventSource.Trtllm),
            ("TensorRT_LLM", EventSource.Trtllm),
            ("kvbm", EventSource.Kvbm),
            ("KVBM", EventSource.Kvbm),
        ],
    )
    def test_names_are_case_insensitive(self, text: str, source: EventSource) -> None:
        assert EventSource.parse(text) is source

    @pytest.mark.parametrize("value", ["sglang", "", 1, None])
    def test_anything_else(self, value: object) -> None:
        with pytest.raises(ConfigError, match=r"must be an event source \(vllm, gpu, trtllm, tensorrt-llm, kvbm\)"):
            EventSource.parse(value)


class TestConsolidatorMode:
    @pytest.mark.parametrize(
        ("text", "mode"), [("dedup", ConsolidatorMode.dedup), (" PASSTHROUGH ", ConsolidatorMode.passthrough)]
    )
    def test_names(self, text: str, mode: ConsolidatorMode) -> None:
        assert ConsolidatorMode.parse(text) is mode

    def test_anything_else(self) -> None:
        with pytest.raises(ConfigError, match="must be 'dedup' or 'passthrough', got 'fast' \\(str\\)"):
            ConsolidatorMode.parse("fast")


class TestTheCustomSetter:
    """``consolidator_config(engine_endpoint, output_endpoint, engine_source)``: upstream panics in the bad
    cases; here the setter records the problem and ``build()`` reports it."""

    def test_vllm(self) -> None:
        config = manager().consolidator_config("tcp://localhost:5557", "tcp://*:5558", EventSource.Vllm).build()

        assert config.consolidator_config == KvEventConsolidatorConfig.new_vllm("tcp://localhost:5557", "tcp://*:5558")

    def test_trtllm(self) -> None:
        config = manager().consolidator_config("tcp://localhost:5557", "tcp://*:6000", EventSource.Trtllm).build()

        assert config.consolidator_config == KvEventConsolidatorConfig.new_trtllm(
            "tcp://localhost:5557", "tcp://*:6000"
        )

    def test_the_source_by_name(self) -> None:
        config = manager().consolidator_config("tcp://localhost:5557", "tcp://*:5558", "tensorrt-llm").build()

        assert config.consolidator_config is not None
        assert config.consolidator_config.engine_source is EventSource.Trtllm

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            (EventSource.Vllm, "output_endpoint is required for vLLM; e.g. 'tcp://*:5558'"),
            (
                EventSource.Trtllm,
                "output_endpoint is required for TensorRT-LLM (the endpoint the consolidator publishes on); "
                "e.g. 'tcp://*:5558'",
            ),
        ],
    )
    def test_the_output_endpoint_is_required(self, source: EventSource, message: str) -> None:
        builder = manager().consolidator_config("tcp://localhost:5557", None, source)  # no panic here

        with pytest.raises(ConfigError) as caught:
            builder.build()

        assert caught.value.errors == [("consolidator_config", message)]

    def test_kvbm_is_never_an_engine_source(self) -> None:
        builder = manager().consolidator_config("tcp://localhost:5557", "tcp://*:5558", EventSource.Kvbm)

        with pytest.raises(ConfigError) as caught:
            builder.build()

        assert caught.value.errors == [
            (
                "consolidator_config",
                "engine_source Kvbm is not valid here: KVBM's own events reach the consolidator directly, "
                "not over ZMQ; use vllm or trtllm (EventSource.Vllm or EventSource.Trtllm)",
            )
        ]

    def test_kvbm_is_refused_even_without_an_output_endpoint(self) -> None:
        with pytest.raises(ConfigError, match="engine_source Kvbm is not valid here"):
            manager().consolidator_config("tcp://localhost:5557", None, "kvbm").build()

    def test_an_unknown_source(self) -> None:
        with pytest.raises(ConfigError) as caught:
            manager().consolidator_config("tcp://localhost:5557", "tcp://*:5558", "sglang").build()

        assert caught.value.errors == [
            (
                "consolidator_config",
                "engine_source must be an event source (vllm, gpu, trtllm, tensorrt-llm, kvbm), got 'sglang' (str)",
            )
        ]

    def test_bad_endpoints_name_the_argument(self) -> None:
        with pytest.raises(ConfigError) as caught:
            manager().consolidator_config("localhost", "tcp://*:5558", EventSource.Vllm).build()

        assert caught.value.errors == [
            (
                "consolidator_config",
                "engine_event_endpoint must look like 'tcp://host:port' or 'ipc:///path', got 'localhost'",
            )
        ]

    def test_a_later_good_call_replaces_a_bad_one(self) -> None:
        config = (
            manager()
            .consolidator_config("tcp://localhost:5557", None, EventSource.Vllm)
            .consolidator_config("tcp://localhost:5557", "tcp://*:5558", EventSource.Vllm)
            .build()
        )

        assert config.consolidator_config is not None

    def test_a_kvbm_consolidator_given_directly_is_refused_too(self) -> None:
        kvbm_sourced = KvEventConsolidatorConfig(engine_source=EventSource.Kvbm)  # valid on its own

        with pytest.raises(ConfigError) as caught:
            KvBlockManagerConfig(runtime=RUNTIME, model=MODEL, consolidator_config=kvbm_sourced)

        ((path, message),) = caught.value.errors
        assert path == "consolidator_config.engine_source"
        assert message.startswith("Kvbm is not valid here")

    def test_the_setter_and_the_config_say_the_same(self) -> None:
        # one rule, one message: the setter reports it at its own field, the config at engine_source
        with pytest.raises(ConfigError) as by_setter:
            manager().consolidator_config("tcp://localhost:5557", "tcp://*:5558", "kvbm").build()
        with pytest.raises(ConfigError) as by_config:
            KvBlockManagerConfig(
                runtime=RUNTIME,
                model=MODEL,
                consolidator_config=KvEventConsolidatorConfig(engine_source=EventSource.Kvbm),
            )

        ((_, setter_message),) = by_setter.value.errors
        ((_, config_message),) = by_config.value.errors
        assert setter_message == f"engine_source {config_message}"
