"""``KvManagerRuntimeConfig``: who the manager is (``worker_id``) and what it runs with."""

from __future__ import annotations

import enum
import sys
import threading
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from ._builder import Builder
from ._rules import Validated, has_attributes, instance, integer, rule, show

if TYPE_CHECKING:
    import asyncio

    from prometheus_client import CollectorRegistry

U64_MAX = 2**64 - 1


class CancellationToken:
    """Cancelling it stops the manager's background work. Children are cancelled with their parent."""

    # The threading.Event is made on the first wait(): every runtime config makes a token, few tokens are
    # ever waited on, and an Event (a Condition and two locks) costs more than the rest of the config.
    __slots__ = ("_cancelled", "_children", "_event", "_lock")

    def __init__(self) -> None:
        self._cancelled = False
        self._event: threading.Event | None = None
        self._children: list[CancellationToken] = []
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            event = self._event
            children = list(self._children)
        if event is not None:
            event.set()
        for child in children:
            child.cancel()

    def is_cancelled(self) -> bool:
        return self._cancelled

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled (True) or until ``timeout`` seconds pass (False)."""
        with self._lock:
            if self._cancelled:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def child_token(self) -> CancellationToken:
        child = CancellationToken()
        with self._lock:
            self._children.append(child)
            cancelled = self._cancelled
        if cancelled:
            child.cancel()
        return child

    def __repr__(self) -> str:
        return f"CancellationToken(cancelled={self.is_cancelled()})"


class NixlMode(enum.Enum):
    ENABLED = "enabled"
    ENABLED_WITH_AGENT = "enabled_with_agent"
    DISABLED = "disabled"


@attrs.frozen
class NixlOptions:
    """Upstream's ``NixlOptions``: ``NixlOptions.ENABLED`` (the manager creates an agent named after
    ``worker_id``), ``NixlOptions.enabled_with_agent(agent)`` (use the caller's agent, never torn down
    by us) or ``NixlOptions.DISABLED``."""

    mode: NixlMode
    agent: Any = attrs.field(default=None, eq=False, repr=lambda a: "None" if a is None else "<agent>")

    ENABLED: ClassVar[NixlOptions]
    DISABLED: ClassVar[NixlOptions]

    def __attrs_post_init__(self) -> None:
        from ..errors import ConfigError, Problem

        if not isinstance(self.mode, NixlMode):
            raise ConfigError([Problem(("nixl", "mode"), f"must be a NixlMode, got {show(self.mode)}")], "runtime")
        if (self.mode is NixlMode.ENABLED_WITH_AGENT) != (self.agent is not None):
            raise ConfigError(
                [Problem(("nixl",), "an agent is given exactly when the mode is ENABLED_WITH_AGENT")],
                "runtime",
            )

    @classmethod
    def enabled_with_agent(cls, agent: object) -> NixlOptions:
        return cls(NixlMode.ENABLED_WITH_AGENT, agent)

    @property
    def enabled(self) -> bool:
        return self.mode is not NixlMode.DISABLED


NixlOptions.ENABLED = NixlOptions(NixlMode.ENABLED)
NixlOptions.DISABLED = NixlOptions(NixlMode.DISABLED)


def _new_registry() -> CollectorRegistry:
    # imported here: prometheus_client is only needed once a runtime config is actually made
    from prometheus_client import CollectorRegistry

    return CollectorRegistry(auto_describe=True)


_registry_check = has_attributes(("register", "collect"), "a prometheus_client CollectorRegistry")


def _async_runtime_check(value: object) -> str | None:
    if value is None or isinstance(value, Executor):
        return None
    # an event loop can only exist once asyncio is imported; importing it here would slow `import kvbm_builder`
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and isinstance(value, asyncio.AbstractEventLoop):
        return None
    return f"must be a concurrent.futures.Executor, an asyncio event loop or None, got {show(value)}"


@attrs.frozen(kw_only=True)
class KvManagerRuntimeConfig(Validated):
    """Runtime configuration. Runtime-only objects (token, executor, registry, agent) take no part in
    equality: two configs are equal when they describe the same manager."""

    _kvbm_root: ClassVar[str] = "runtime"

    worker_id: int = attrs.field(metadata=rule(integer(min=0, max=U64_MAX), "a u64; also the NIXL agent name"))
    cancellation_token: CancellationToken = attrs.field(
        factory=CancellationToken,
        eq=False,
        metadata=rule(instance(CancellationToken, what="a kvbm_builder.CancellationToken")),
    )
    nixl: NixlOptions = attrs.field(
        default=NixlOptions.ENABLED,
        metadata=rule(instance(NixlOptions, what="a NixlOptions (use enable_nixl() / disable_nixl())")),
    )
    async_runtime: Executor | asyncio.AbstractEventLoop | None = attrs.field(
        default=None, eq=False, metadata=rule(_async_runtime_check)
    )
    metrics_registry: CollectorRegistry = attrs.field(
        factory=_new_registry, eq=False, repr=False, metadata=rule(_registry_check)
    )

    @staticmethod
    def builder() -> KvManagerRuntimeConfigBuilder:
        return KvManagerRuntimeConfigBuilder()


class KvManagerRuntimeConfigBuilder(Builder[KvManagerRuntimeConfig]):
    _target = KvManagerRuntimeConfig

    def worker_id(self, value: int) -> KvManagerRuntimeConfigBuilder:
        return self._set("worker_id", value)

    def cancellation_token(self, value: CancellationToken) -> KvManagerRuntimeConfigBuilder:
        return self._set("cancellation_token", value)

    def nixl(self, value: NixlOptions) -> KvManagerRuntimeConfigBuilder:
        return self._set("nixl", value)

    def enable_nixl(self) -> KvManagerRuntimeConfigBuilder:
        return self._set("nixl", NixlOptions.ENABLED)

    def use_nixl_agent(self, agent: object) -> KvManagerRuntimeConfigBuilder:
        if agent is None:
            return self._reject(
                "nixl",
                "use_nixl_agent() needs an agent, got None; use enable_nixl() to let the manager create one",
            )
        return self._set("nixl", NixlOptions.enabled_with_agent(agent))

    def disable_nixl(self) -> KvManagerRuntimeConfigBuilder:
        return self._set("nixl", NixlOptions.DISABLED)

    def async_runtime(self, value: Executor | asyncio.AbstractEventLoop | None) -> KvManagerRuntimeConfigBuilder:
        return self._set("async_runtime", value)

    def metrics_registry(self, value: CollectorRegistry) -> KvManagerRuntimeConfigBuilder:
        return self._set("metrics_registry", value)
