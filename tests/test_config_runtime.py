"""KvManagerRuntimeConfig: worker id, cancellation, NIXL options, background executor, metrics registry."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from callers import Agent
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from kvbm_builder import ConfigError, KvManagerRuntimeConfig, UninitializedFieldError
from kvbm_builder.config import CancellationToken, NixlMode, NixlOptions

U64_MAX = 2**64 - 1


def test_only_worker_id_is_required_and_the_defaults_are_upstreams() -> None:
    runtime = KvManagerRuntimeConfig.builder().worker_id(7).build()

    assert runtime.worker_id == 7
    assert isinstance(runtime.cancellation_token, CancellationToken)
    assert not runtime.cancellation_token.is_cancelled()
    assert runtime.nixl == NixlOptions.ENABLED
    assert runtime.async_runtime is None
    assert isinstance(runtime.metrics_registry, CollectorRegistry)


def test_worker_id_left_unset() -> None:
    with pytest.raises(UninitializedFieldError) as caught:
        KvManagerRuntimeConfig.builder().disable_nixl().build()

    assert str(caught.value) == "`worker_id` must be initialized"
    assert caught.value.missing == ("worker_id",)
    assert caught.value.errors == [("runtime.worker_id", "must be initialized")]


def test_every_config_gets_its_own_token_and_its_own_registry_never_the_global_one() -> None:
    first = KvManagerRuntimeConfig.builder().worker_id(0).build()
    second = KvManagerRuntimeConfig.builder().worker_id(0).build()

    assert first.cancellation_token is not second.cancellation_token
    assert first.metrics_registry is not second.metrics_registry
    assert REGISTRY not in (first.metrics_registry, second.metrics_registry)
    # so two managers in one process can each register the same metric names
    Counter("kvbm_offload_blocks_d2h", "blocks offloaded", registry=first.metrics_registry)
    Counter("kvbm_offload_blocks_d2h", "blocks offloaded", registry=second.metrics_registry)


@pytest.mark.parametrize("worker_id", [0, 1, 7, U64_MAX])
def test_worker_id_is_any_u64(worker_id: int) -> None:
    assert KvManagerRuntimeConfig.builder().worker_id(worker_id).build().worker_id == worker_id


@pytest.mark.parametrize(
    ("worker_id", "message"),
    [
        (-1, "must be >= 0, got -1"),
        (U64_MAX + 1, f"must be <= {U64_MAX}, got {U64_MAX + 1}"),
        (True, "must be an integer, got True (bool)"),
        ("7", "must be an integer, got '7' (str)"),
        (7.0, "must be an integer, got 7.0"),
    ],
)
def test_worker_id_outside_u64(worker_id: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerRuntimeConfig.builder().worker_id(worker_id).build()  # type: ignore[arg-type]

    assert caught.value.errors == [("runtime.worker_id", message)]


def test_nixl_setters() -> None:
    agent = Agent()
    builder = KvManagerRuntimeConfig.builder().worker_id(1)

    assert builder.clone().disable_nixl().build().nixl == NixlOptions.DISABLED
    assert builder.clone().disable_nixl().enable_nixl().build().nixl == NixlOptions.ENABLED
    with_agent = builder.clone().use_nixl_agent(agent).build().nixl
    assert with_agent.mode is NixlMode.ENABLED_WITH_AGENT
    assert with_agent.agent is agent
    assert builder.clone().nixl(NixlOptions.DISABLED).build().nixl == NixlOptions.DISABLED


def test_nixl_options_say_whether_nixl_is_on() -> None:
    assert NixlOptions.ENABLED.enabled
    assert NixlOptions.enabled_with_agent(Agent()).enabled
    assert not NixlOptions.DISABLED.enabled


def test_use_nixl_agent_without_an_agent_is_reported_at_build_not_at_the_call() -> None:
    builder = KvManagerRuntimeConfig.builder().worker_id(1).use_nixl_agent(None)

    with pytest.raises(ConfigError) as caught:
        builder.build()

    ((path, message),) = caught.value.errors
    assert path == "runtime.nixl"
    assert "use_nixl_agent() needs an agent, got None; use enable_nixl()" in message


def test_a_later_nixl_setter_replaces_a_rejected_one() -> None:
    runtime = KvManagerRuntimeConfig.builder().worker_id(1).use_nixl_agent(None).enable_nixl().build()

    assert runtime.nixl == NixlOptions.ENABLED


def test_nixl_options_check_their_own_shape() -> None:
    with pytest.raises(ConfigError, match="an agent is given exactly when the mode is ENABLED_WITH_AGENT"):
        NixlOptions(NixlMode.DISABLED, Agent())
    with pytest.raises(ConfigError, match="an agent is given exactly when the mode is ENABLED_WITH_AGENT"):
        NixlOptions(NixlMode.ENABLED_WITH_AGENT)
    with pytest.raises(ConfigError) as caught:
        NixlOptions("enabled")  # type: ignore[arg-type]
    assert caught.value.errors == [("runtime.nixl.mode", "must be a NixlMode, got 'enabled' (str)")]


def test_nixl_must_be_nixl_options() -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerRuntimeConfig.builder().worker_id(1).nixl(True).build()  # type: ignore[arg-type]

    assert caught.value.errors == [
        ("runtime.nixl", "must be 'enabled' or 'disabled' (or NixlOptions), got True (bool)")
    ]
    assert KvManagerRuntimeConfig.builder().worker_id(1).nixl("Disabled").build().nixl == NixlOptions.DISABLED  # type: ignore[arg-type]


def test_use_nixl_agent_checks_the_agents_shape_at_build() -> None:
    # upstream's setter takes a NixlAgent; any object used to pass build() and fail only when the manager started
    builder = KvManagerRuntimeConfig.builder().worker_id(1).use_nixl_agent("not an agent")

    with pytest.raises(ConfigError) as caught:
        builder.build()

    assert caught.value.errors == [
        (
            "runtime.nixl",
            "use_nixl_agent() needs a NIXL agent: must be a NIXL agent (lacks register_memory, deregister_memory, "
            "get_reg_descs), got 'not an agent' (str)",
        )
    ]
    with pytest.raises(ConfigError, match="must be a NIXL agent"):
        NixlOptions.enabled_with_agent(object())


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown()


@pytest.fixture
def event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_async_runtime_is_an_executor_or_an_event_loop(
    executor: ThreadPoolExecutor, event_loop: asyncio.AbstractEventLoop
) -> None:
    builder = KvManagerRuntimeConfig.builder().worker_id(1)

    assert builder.clone().async_runtime(executor).build().async_runtime is executor
    assert builder.clone().async_runtime(event_loop).build().async_runtime is event_loop
    assert builder.clone().async_runtime(None).build().async_runtime is None


def test_async_runtime_of_another_kind() -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerRuntimeConfig.builder().worker_id(1).async_runtime("tokio").build()  # type: ignore[arg-type]

    assert caught.value.errors == [
        (
            "runtime.async_runtime",
            "must be a concurrent.futures.Executor, an asyncio event loop or None, got 'tokio' (str)",
        )
    ]


def test_a_registry_of_your_own() -> None:
    registry = CollectorRegistry()

    assert KvManagerRuntimeConfig.builder().worker_id(1).metrics_registry(registry).build().metrics_registry is registry


def test_the_registry_must_be_a_registry() -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerRuntimeConfig.builder().worker_id(1).metrics_registry({}).build()  # type: ignore[arg-type]

    assert caught.value.errors == [
        (
            "runtime.metrics_registry",
            "must be a prometheus_client CollectorRegistry (lacks register, collect), got {} (dict)",
        )
    ]


def test_the_token_must_be_a_cancellation_token() -> None:
    with pytest.raises(ConfigError) as caught:
        KvManagerRuntimeConfig.builder().worker_id(1).cancellation_token(threading.Event()).build()  # type: ignore[arg-type]

    ((path, message),) = caught.value.errors
    assert path == "runtime.cancellation_token"
    assert message.startswith("must be a kvbm_builder.CancellationToken, got <threading.Event")


def test_runtime_objects_take_no_part_in_equality() -> None:
    # two configs are equal when they describe the same manager
    first = KvManagerRuntimeConfig.builder().worker_id(3).build()
    second = KvManagerRuntimeConfig.builder().worker_id(3).build()

    assert first == second
    assert first != KvManagerRuntimeConfig.builder().worker_id(4).build()
    assert first != KvManagerRuntimeConfig.builder().worker_id(3).disable_nixl().build()


class TestCancellationToken:
    def test_cancel_is_seen_by_the_token_and_its_children(self) -> None:
        token = CancellationToken()
        child = token.child_token()
        grandchild = child.child_token()

        token.cancel()

        assert token.is_cancelled() and child.is_cancelled() and grandchild.is_cancelled()

    def test_cancelling_a_child_leaves_the_parent_running(self) -> None:
        token = CancellationToken()
        token.child_token().cancel()

        assert not token.is_cancelled()

    def test_a_child_of_a_cancelled_token_is_born_cancelled(self) -> None:
        token = CancellationToken()
        token.cancel()

        assert token.child_token().is_cancelled()

    def test_wait_returns_whether_the_token_was_cancelled(self) -> None:
        token = CancellationToken()

        assert token.wait(timeout=0) is False
        token.cancel()
        assert token.wait(timeout=0) is True
        assert token.wait() is True
        token.cancel()  # cancelling twice is harmless
        assert token.is_cancelled()

    def test_cancel_wakes_a_thread_that_waits(self) -> None:
        token = CancellationToken()
        waiting = threading.Event()
        woke: list[bool] = []

        def worker() -> None:
            waiting.set()
            woke.append(token.wait())

        thread = threading.Thread(target=worker)
        thread.start()
        waiting.wait()
        token.cancel()
        thread.join()

        assert woke == [True]

    def test_repr_says_whether_it_was_cancelled(self) -> None:
        token = CancellationToken()
        assert repr(token) == "CancellationToken(cancelled=False)"
        token.cancel()
        assert repr(token) == "CancellationToken(cancelled=True)"
