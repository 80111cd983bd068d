"""NIXL registration of the tiers' storages, so that NIXL can move blocks between them (and to peers).

:class:`NixlRegistry` owns the registrations and, for ``NixlOptions.ENABLED``, the agent:

- ``ENABLED``: creates ``nixl_agent(str(worker_id))`` with the UCX backend, POSIX when a disk tier exists,
  and GDS_MT when that plugin loads (its absence is not an error);
- ``ENABLED_WITH_AGENT``: uses the caller's agent and never tears it down;
- ``DISABLED``: creates nothing; ``register()`` returns None.

Each storage is registered with every backend of the agent that handles its memory type: device ->
``VRAM`` (devId: the GPU ordinal), pinned and system -> ``DRAM`` (devId 0), disk -> ``FILE`` (offset 0,
the whole file, devId: the file descriptor). ``close()`` deregisters everything in reverse order; call it
before the memory is freed. What NIXL refuses to deregister is named by :class:`NixlDeregistrationError`
(``still_registered``): keep that memory, and call ``close()`` again later. Until then the registry keeps
itself, and through its records those storages, alive (:meth:`NixlRegistry.unreleased` lists such registries), so
the garbage collector never frees memory NIXL still holds; a registry collected unclosed deregisters first. The
registry records a storage as soon as the agent holds it, so an interrupt (Ctrl-C) never leaves a registration it
does not know of; an interrupted ``close()`` is finished by calling it again. nixl itself is imported on first use
(``pip install 'kvbm-builder[nixl]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, NoReturn

import attrs

from .config.protocols import Storage, StorageKind, Tier
from .config.runtime import NixlMode, NixlOptions
from .errors import NixlDeregistrationError, NixlError

__all__ = ["NixlDeregistrationError", "NixlRegistration", "NixlRegistry"]

log = logging.getLogger("kvbm_builder.nixl")

_INSTALL = "pip install 'kvbm-builder[nixl]'"
#: What an own agent registers each memory type with: UCX moves G1 <-> G2 (and to peers), POSIX G2 <-> G3,
#: GDS_MT G1 <-> G3 without a host bounce. GDS_MT is tried on top: where cuFile cannot take a file or
#: buffer it is dropped for good, and the storage stays registered with the others.
_PREFERRED = {"DRAM": ("UCX", "POSIX"), "VRAM": ("UCX", "GDS_MT"), "FILE": ("POSIX", "GDS_MT")}
_OPTIONAL = frozenset({"GDS_MT"})
_NVIDIA_FS = "/proc/driver/nvidia-fs/version"
#: Registries that could not deregister everything, kept alive (with the storages their records hold) until a
#: close() succeeds: collecting them would free memory NIXL still has registered.
_UNRELEASED: set[NixlRegistry] = set()


@attrs.frozen
class NixlRegistration:
    """One storage registered with an agent: what NIXL was told, and the backends that still hold it."""

    storage: Storage = attrs.field(eq=False)
    tier: Tier
    mem_type: str
    addr: int
    size: int
    dev_id: int
    backends: tuple[str, ...]
    descs: Any = attrs.field(eq=False, repr=False)


def _describe(storage: Storage, tier: Tier | None = None) -> str:
    words = (tier or storage.kind.tier).words
    where = getattr(storage, "path", None) or f"0x{storage.addr:x}"
    return f"the {words} storage ({storage.kind.nixl_mem_type}, {storage.size} bytes at {where})"


def _not_found(exc: Exception) -> bool:
    """NIXL_ERR_NOT_FOUND: the backend does not hold that memory (any more)."""
    return type(exc).__name__ == "nixlNotFoundError" or "NIXL_ERR_NOT_FOUND" in str(exc)


def _failures(failed: Sequence[tuple[NixlRegistration, Exception]]) -> str:
    return "; ".join(
        f"{_describe(r.storage, r.tier)} with backends {list(r.backends)} ({type(e).__name__}: {e})" for r, e in failed
    )


def _import_nixl(log_level: int | str | None) -> tuple[Any, Any]:
    """``(nixl_agent, nixl_agent_config)``, with NIXL's Python logging lowered to WARNING unless the user
    asked otherwise (``NIXL_LOG_LEVEL`` set, or ``log_level`` given)."""
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as exc:
        raise NixlError(f"NIXL is not installed ({exc}); install it with {_INSTALL}, or disable NIXL") from exc
    if log_level is not None:
        logging.getLogger("nixl").setLevel(log_level)
    elif not os.environ.get("NIXL_LOG_LEVEL"):
        logging.getLogger("nixl").setLevel(logging.WARNING)
    return nixl_agent, nixl_agent_config


class NixlRegistry:
    """The NIXL agent of one manager and the storages registered with it.

    ``with_files=True`` says a disk tier exists (the agent then gets the POSIX backend). ``log_level`` sets the
    ``nixl`` logger's level (default: WARNING, unless ``NIXL_LOG_LEVEL`` is set).
    """

    def __init__(
        self, options: NixlOptions, worker_id: int, *, with_files: bool = False, log_level: int | str | None = None
    ) -> None:
        self._options = options
        self._registrations: list[NixlRegistration] = []
        self._agent: Any = None
        self._owns_agent = False
        self._closed = False
        self._closing = False  # close() was called: no new registrations
        self._broken: set[str] = set()
        if options.mode is NixlMode.DISABLED:
            return
        if options.mode is NixlMode.ENABLED_WITH_AGENT:
            agent = options.agent
            missing = [n for n in ("get_reg_descs", "register_memory", "deregister_memory") if not hasattr(agent, n)]
            if missing:
                raise NixlError(
                    f"the agent given to use_nixl_agent() is not a nixl_agent (it lacks {', '.join(missing)})"
                )
            self._agent = agent
            return
        nixl_agent, nixl_agent_config = _import_nixl(log_level)
        name = str(worker_id)
        wanted = ["UCX", "POSIX"] if with_files else ["UCX"]
        try:
            agent = nixl_agent(name, nixl_agent_config(backends=wanted))
        except Exception as exc:
            raise NixlError(f"cannot create the NIXL agent {name!r} (worker_id) with backends {wanted}: {exc}") from exc
        missing = [b for b in wanted if b not in agent.backends]
        if missing:
            raise NixlError(
                f"NIXL agent {name!r}: backend(s) {missing} could not be created (plugins found: "
                f"{agent.get_plugin_list()}); reinstall nixl ({_INSTALL})"
                + ("; the disk tier needs POSIX" if "POSIX" in missing else "")
            )
        if with_files:
            self._try_gds(agent)
        self._agent = agent
        self._owns_agent = True

    @staticmethod
    def _try_gds(agent: Any) -> None:
        # GPUDirect Storage moves G1 <-> G3 without a host bounce. It needs CUDA and cuFile: probe quietly.
        from .storage import cuda_available

        if not cuda_available() or "GDS_MT" not in agent.get_plugin_list():
            log.debug("NIXL GDS_MT not tried: no CUDA or no plugin")
            return
        if not os.path.exists(_NVIDIA_FS):
            # Without the nvidia-fs driver cuFile refuses file handles (seen on an H200 VM: error 5027), and
            # the refusal is printed by NIXL's C++ side whatever our log level: do not ask.
            log.debug("NIXL GDS_MT not tried: %s is missing (no GPUDirect Storage driver)", _NVIDIA_FS)
            return
        try:
            agent.create_backend("GDS_MT")
        except Exception as exc:
            log.debug("NIXL GDS_MT backend unavailable (%s); disk transfers use POSIX", str(exc))

    # --- properties -----------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._options.mode is not NixlMode.DISABLED

    @property
    def agent(self) -> Any:
        """The nixl_agent, or None when NIXL is disabled or the registry is closed."""
        return self._agent

    @property
    def owns_agent(self) -> bool:
        """True when this registry created the agent (``ENABLED``)."""
        return self._owns_agent

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(getattr(self._agent, "backends", {})) if self._agent is not None else ()

    @property
    def registrations(self) -> tuple[NixlRegistration, ...]:
        """What is registered now, oldest first. After a failed :meth:`close`: what NIXL still holds."""
        return tuple(self._registrations)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has deregistered everything and let go of the agent."""
        return self._closed

    # --- registration ---------------------------------------------------------------------------------

    def backends_for(self, mem_type: str) -> tuple[str, ...]:
        """The agent's backends that can register ``mem_type`` (``"DRAM"``, ``"VRAM"``, ``"FILE"``)."""
        agent = self._agent
        if agent is None:
            return ()
        return tuple(b for b in getattr(agent, "backends", {}) if f"{mem_type}_SEG" in agent.get_backend_mem_types(b))

    def register(self, storage: Storage, tier: Tier | None = None) -> NixlRegistration | None:
        """Register ``storage`` (of ``tier``, by default the tier its kind belongs to) with NIXL.

        Returns None when NIXL is disabled, the earlier registration when the storage already is registered.
        On failure everything this registry registered is deregistered, then NixlError names the storage; what
        could not be deregistered stays in :attr:`registrations` and is named too (a
        :class:`NixlDeregistrationError`, whose ``still_registered`` lists it)."""
        tier = _checked_tier(storage, tier)
        if self._closing:
            raise NixlError(f"cannot register {_describe(storage, tier)}: the NIXL registry is closed")
        if self._agent is None:
            return None
        for existing in self._registrations:
            if existing.storage is storage:
                return existing
        if getattr(storage, "closed", False):
            raise NixlError(f"cannot register {_describe(storage, tier)}: the storage is closed")
        mem_type = storage.kind.nixl_mem_type
        dev_id = int(getattr(storage, "device_id", 0))
        backends = self._chosen_backends(mem_type)
        if not backends and self._owns_agent and mem_type == "FILE":
            self._add_posix()
            backends = self._chosen_backends(mem_type)
        if not backends:
            self._fail(
                f"cannot register {_describe(storage, tier)}: no backend of NIXL agent {self._name()!r} handles "
                f"{mem_type} memory (backends: {list(self.backends)})"
                + (
                    "; create a POSIX backend on the agent (agent.create_backend('POSIX'))"
                    if mem_type == "FILE"
                    else ""
                ),
                None,
            )
        required = [b for b in backends if b not in _OPTIONAL] or list(backends)
        try:
            descs = self._agent.get_reg_descs([(storage.addr, storage.size, dev_id, "")], mem_type)
            if descs is None:
                raise ValueError("get_reg_descs() returned no descriptor list")
            self._register_with(descs, required)
        except Exception as exc:
            self._fail(
                f"NIXL agent {self._name()!r} could not register {_describe(storage, tier)} with backends "
                f"{list(backends)}: {type(exc).__name__}: {exc}. Run with NIXL_LOG_LEVEL=DEBUG for NIXL's reason"
                + ("; VRAM needs NIXL's UCX built with CUDA support" if mem_type == "VRAM" else ""),
                exc,
            )
        # recorded as soon as the agent holds it, so that close() deregisters it whatever happens next
        registration = NixlRegistration(
            storage, tier, mem_type, storage.addr, storage.size, dev_id, tuple(required), descs
        )
        self._registrations.append(registration)
        for backend in backends:
            if backend not in required and self._try_optional(descs, backend):
                registration = self._replace(registration, backends=(*registration.backends, backend))
        return registration

    def register_all(self, storages: Iterable[Storage], tier: Tier | None = None) -> list[NixlRegistration]:
        """Register each storage in order; all or nothing (see :meth:`register`)."""
        out = []
        for storage in storages:
            registration = self.register(storage, tier)
            if registration is not None:
                out.append(registration)
        return out

    def _chosen_backends(self, mem_type: str) -> tuple[str, ...]:
        able = [b for b in self.backends_for(mem_type) if b not in self._broken]
        if not self._owns_agent:
            return tuple(able)  # a caller's agent: every backend they gave it
        return tuple(b for b in _PREFERRED.get(mem_type, tuple(able)) if b in able)

    def _register_with(self, descs: Any, backends: list[str]) -> None:
        """``register_memory`` that leaves nothing behind when interrupted (KeyboardInterrupt, ...)."""
        try:
            self._agent.register_memory(descs, backends=backends)
        except Exception:
            raise
        except BaseException:
            # the agent may already hold the memory (the interrupt lands when the call returns): take it back
            for backend in backends:
                try:
                    self._agent.deregister_memory(descs, backends=[backend])
                except Exception as exc:
                    if not _not_found(exc):
                        log.error(
                            "NIXL %s may still hold memory after an interrupted registration: %s", backend, str(exc)
                        )
            raise

    def _try_optional(self, descs: Any, backend: str) -> bool:
        try:
            self._register_with(descs, [backend])
        except Exception as exc:
            log.debug("NIXL %s cannot register here (%s); not tried again", backend, str(exc))
            self._broken.add(backend)
            return False
        return True

    def _add_posix(self) -> None:
        try:
            self._agent.create_backend("POSIX")
        except Exception as exc:
            log.debug("NIXL POSIX backend could not be created: %s", str(exc))

    def _name(self) -> str:
        return str(getattr(self._agent, "name", "?"))

    def _fail(self, message: str, cause: Exception | None) -> NoReturn:
        """Deregister everything registered so far, then raise NixlError (naming what NIXL still holds)."""
        before = len(self._registrations)
        failed = self._rollback()
        if failed:
            _UNRELEASED.add(self)
            raise NixlDeregistrationError(
                f"{message}; of the {before} storage(s) registered before, {len(failed)} could not be deregistered "
                f"and stay registered (do not free their memory; close() tries again): {_failures(failed)}",
                (r for r, _ in failed),
                self,
            ) from cause
        raise NixlError(
            f"{message}; the {before} storage(s) registered before were deregistered" if before else message
        ) from cause

    def _replace(self, registration: NixlRegistration, **changes: Any) -> NixlRegistration:
        new = attrs.evolve(registration, **changes)
        index = next(i for i, r in enumerate(self._registrations) if r is registration)
        self._registrations[index] = new
        return new

    def _deregister(self, registration: NixlRegistration) -> tuple[NixlRegistration | None, Exception | None]:
        """Deregister one storage, backend by backend (newest first), keeping the record up to date after each
        one, so that an interrupt or a failure leaves exactly what NIXL still holds. Returns that (None when
        nothing) and the error."""
        current = registration
        for backend in reversed(registration.backends):
            try:
                self._agent.deregister_memory(registration.descs, backends=[backend])
            except Exception as exc:
                if not _not_found(exc):  # not found: that backend no longer holds it (an earlier try did it)
                    # the message as text: a log record holding the exception would hold its frames, and the
                    # storages in them, past their release
                    log.warning(
                        "NIXL could not deregister %s from %s: %s", _describe(current.storage), backend, str(exc)
                    )
                    return current, exc
            rest = tuple(b for b in current.backends if b != backend)
            if rest:
                current = self._replace(current, backends=rest)
            else:
                self._registrations.remove(current)
        return None, None

    def _rollback(self) -> list[tuple[NixlRegistration, Exception]]:
        """Deregister every storage, newest first; what could not be deregistered stays recorded."""
        failed = []
        for registration in reversed(self._registrations.copy()):
            left, exc = self._deregister(registration)
            if left is not None and exc is not None:
                failed.append((left, exc))
        return failed

    def close(self) -> None:
        """Deregister every storage, newest first, then let go of the agent (an own agent is destroyed;
        a caller's agent is left as it is). Call it before the storages are freed. Safe to call twice.

        When some storage cannot be deregistered, :class:`NixlDeregistrationError` names it: ``still_registered``
        lists the storages whose memory must be kept, the registry keeps them (and the agent) and a later
        close() tries again. An interrupted close() is finished by calling it again. New registrations are
        refused from the first call on."""
        if self._closed:
            return
        self._closing = True
        try:
            failed = self._rollback() if self._agent is not None else []
        except BaseException:  # interrupted: what is recorded is still registered, keep it reachable
            if self._registrations:
                _UNRELEASED.add(self)
            raise
        if failed:
            _UNRELEASED.add(self)
            raise NixlDeregistrationError(
                f"NIXL agent {self._name()!r} could not deregister {len(failed)} storage(s); they stay registered, "
                f"so their memory must not be freed (close() tries again): {_failures(failed)}",
                (r for r, _ in failed),
                self,
            )
        self._agent = None
        self._closed = True
        _UNRELEASED.discard(self)

    @staticmethod
    def unreleased() -> tuple[NixlRegistry, ...]:
        """Registries whose close() (or rollback) left storages registered: they are kept alive, with those storages,
        until a close() succeeds."""
        return tuple(_UNRELEASED)

    def __del__(self) -> None:
        # collected unclosed (not through a manager): deregister before the storages the records hold can be freed;
        # if NIXL refuses, close() has put this registry back among the unreleased, alive
        if getattr(self, "_closed", True) or not getattr(self, "_registrations", None):
            return
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> NixlRegistry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._registrations)} registered"
        return f"NixlRegistry({self._options.mode.value}, agent={self._name() if self._agent else None}, {state})"


def _checked_tier(storage: object, tier: Tier | None) -> Tier:
    """The tier ``storage`` is registered for; NixlError when it is not a storage or not of that tier."""
    kind = getattr(storage, "kind", None)
    addr, size = getattr(storage, "addr", None), getattr(storage, "size", None)
    if not isinstance(kind, StorageKind) or not isinstance(addr, int) or not isinstance(size, int):
        raise NixlError(
            f"cannot register {storage!r} ({type(storage).__name__}) with NIXL: not a storage "
            "(it needs kind: a StorageKind, and addr and size: ints)"
        )
    if tier is None:
        return kind.tier
    if not isinstance(tier, Tier) or kind not in tier.accepts:
        raise NixlError(
            f"cannot register the {kind.value} storage {storage!r} with NIXL as {tier!r}: "
            f"a {kind.value} storage belongs to the {kind.tier.words}"
        )
    return tier
