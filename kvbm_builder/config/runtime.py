"""``KvManagerRuntimeConfig``: who the manager is (``worker_id``) and what it runs with."""

from __future__ import annotations

import enum
import sys
import threading
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from ..errors import ConfigError, Problem, show
from ._builder import Builder
from .fields import U64_MAX, Rule, Validated, duck, field, instance, integer, spelled
from .names import name_key

if TYPE_CHECKING:
    import asyncio

    from prometheus_client import CollectorRegistry


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


#: What the configuration checks of a caller's NIXL agent (``nixl._api.nixl_agent``): the calls registration makes.
_agent_shape = duck(("register_memory", "deregister_memory", "get_reg_descs"), "a NIXL agent")


@attrs.frozen
class NixlOptions:
    """Upstream's ``NixlOptions``: ``NixlOptions.ENABLED`` (the manager creates an agent named after
    ``worker_id``), ``NixlOptions.enabled_with_agent(agent)`` (use the caller's agent, never torn down
    by us) or ``NixlOptions.DISABLED``. A document says ``"enabled"`` or ``"disabled"`` (:meth:`parse`)."""

    mode: NixlMode
    agent: Any = attrs.field(default=None, eq=False, repr=lambda a: "None" if a is None else "<agent>")

    ENABLED: ClassVar[NixlOptions]
    DISABLED: ClassVar[NixlOptions]

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.mode, NixlMode):
            raise ConfigError([Problem(("nixl", "mode"), f"must be a NixlMode, got {show(self.mode)}")], "runtime")
        if (self.mode is NixlMode.ENABLED_WITH_AGENT) != (self.agent is not None):
            raise ConfigError(
                [Problem(("nixl",), "an agent is given exactly when the mode is ENABLED_WITH_AGENT")],
                "runtime",
            )
        refused = None if self.agent is None else _agent_shape(self.agent)
        if refused is not None:
            raise ConfigError([Problem(("nixl", "agent"), refused)], "runtime")

    @classmethod
    def enabled_with_agent(cls, agent: object) -> NixlOptions:
        return cls(NixlMode.ENABLED_WITH_AGENT, agent)

    @classmethod
    def parse(cls, value: object) -> NixlOptions:
        """``"enabled"`` or ``"disabled"`` (any case, spaces around ignored), or NixlOptions itself."""
        if isinstance(value, NixlOptions):
            return value
        word = name_key(value, trim=True)
        if word in ("enabled", "disabled"):
            return cls.ENABLED if word == "enabled" else cls.DISABLED
        if word is not None and word.replace("_", "").replace("-", "") == "enabledwithagent":
            message = (
                "an agent cannot come from a document; set it in Python with "
                "KvManagerRuntimeConfig.builder().use_nixl_agent(agent), or write 'enabled' to let the manager "
                "create one"
            )
        else:
            message = f"must be 'enabled' or 'disabled' (or NixlOptions), got {show(value)}"
        raise ConfigError([Problem((), message)])

    @property
    def enabled(self) -> bool:
        return self.mode is not NixlMode.DISABLED


NixlOptions.ENABLED = NixlOptions(NixlMode.ENABLED)
NixlOptions.DISABLED = NixlOptions(NixlMode.DISABLED)


def _new_registry() -> CollectorRegistry:
    # imported here: prometheus_client is only needed once a runtime config is actually made
    from prometheus_client import CollectorRegistry

    return CollectorRegistry(auto_describe=True)


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

    worker_id: int = field(
        rule=integer(min=0, max=U64_MAX), doc="This worker's id (a u64); also the NIXL agent's name."
    )
    cancellation_token: CancellationToken = field(
        factory=CancellationToken,
        eq=False,
        document=False,
        rule=instance(CancellationToken, what="a kvbm_builder.CancellationToken"),
        doc="Cancelling it stops the manager's background work.",
    )
    nixl: NixlOptions = field(
        default=NixlOptions.ENABLED,
        **spelled(NixlOptions.parse, NixlOptions, names=(("enabled", "disabled"), "trim")),
        doc="'enabled': the manager creates its own NIXL agent; 'disabled': no NIXL.",
    )
    async_runtime: Executor | asyncio.AbstractEventLoop | None = field(
        default=None,
        eq=False,
        document=False,
        rule=Rule(_async_runtime_check),
        doc="An executor or event loop for background work.",
    )
    metrics_registry: CollectorRegistry = field(
        factory=_new_registry,
        eq=False,
        repr=False,
        document=False,
        rule=duck(("register", "collect"), "a prometheus_client CollectorRegistry"),
        doc="Where the manager's metrics are registered (a new one per config, never the global one).",
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
        """Custom setter (upstream's): use the caller's NIXL agent. Its shape is checked at ``build()``."""
        if agent is None:
            return self._reject(
                "nixl",
                "use_nixl_agent() needs an agent, got None; use enable_nixl() to let the manager create one",
            )
        refused = _agent_shape(agent)
        if refused is not None:
            return self._reject("nixl", f"use_nixl_agent() needs a NIXL agent: {refused}")
        return self._set("nixl", NixlOptions.enabled_with_agent(agent))

    def disable_nixl(self) -> KvManagerRuntimeConfigBuilder:
        return self._set("nixl", NixlOptions.DISABLED)

    def async_runtime(self, value: Executor | asyncio.AbstractEventLoop | None) -> KvManagerRuntimeConfigBuilder:
        return self._set("async_runtime", value)

    def metrics_registry(self, value: CollectorRegistry) -> KvManagerRuntimeConfigBuilder:
        return self._set("metrics_registry", value)
