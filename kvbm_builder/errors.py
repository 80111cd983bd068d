"""One exception tree, rooted in :class:`KvbmError`.

Every error names what it is about (a field, a tier, a path or a variable) and says what to do.
Configuration problems are data: a :class:`ConfigError` carries every :class:`Problem` found in one
``build()`` or one ``load()``, each with the path of the value it is about.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:  # only for annotations: errors import nothing of the package
    from .config.protocols import Storage, Tier
    from .manager import KvBlockManager
    from .nixl import NixlRegistration, NixlRegistry

__all__ = [
    "AllocationError",
    "BlockPoolError",
    "BlockReleasedError",
    "BuilderConsumedError",
    "ConfigError",
    "DiskReservationWarning",
    "DiskStorageError",
    "GpuUnavailableError",
    "KvbmError",
    "LayoutError",
    "LayoutIndexError",
    "LoadError",
    "MetricsError",
    "MetricsRegistryError",
    "MetricsServerError",
    "MissingDependencyError",
    "NixlDeregistrationError",
    "NixlError",
    "OffloadError",
    "PoolClosedError",
    "PoolExhaustedError",
    "Problem",
    "ReleaseError",
    "RuntimeObjectError",
    "RuntimeObjectWarning",
    "SequenceHashError",
    "StorageBufferError",
    "StorageClosedError",
    "StorageTooSmallError",
    "TransferError",
    "UninitializedFieldError",
    "UnknownTierError",
    "UsageError",
    "show",
    "show_key",
]

PathItem = str | int

_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxdict = _repr.maxlist = _repr.maxtuple = _repr.maxset = 4
_repr.maxstring = _repr.maxother = 60
_repr.maxlong = 60


def show(value: object, *, typed: bool = True) -> str:
    """A value as every message shows it: ``3``, ``None``, ``'4' (str)``, ``True (bool)``, ``[[[...]]] (list)``;
    ``typed=False`` leaves out the type (``'16 gigs'``, where the words already say what it is).

    The one value renderer of the package. It never fails and never runs long, whatever the value (a 5000-digit
    integer, a deeply nested list, a megabyte of text), so a message about hostile input stays one short line.
    """
    if type(value) is int and value.bit_length() > 192:  # str() of an int past 4300 digits raises ValueError
        text = f"{'a negative' if value < 0 else 'an'} integer of {value.bit_length()} bits"
        return f"{text} (int)" if typed else text
    if type(value) in (int, float) or value is None:
        return repr(value)
    try:
        text = _repr.repr(value)
    except Exception:  # a caller's object whose __repr__ fails
        text = f"<{type(value).__name__} object>"
    return f"{text} ({type(value).__name__})" if typed else text


def show_key(key: object) -> str:
    """A document's key as a path shows it: a text of up to 60 characters as it is, anything else as :func:`show`
    renders it (a megabyte-long key stays a short path)."""
    if isinstance(key, str) and len(key) <= _repr.maxstring:
        return key
    return show(key, typed=not isinstance(key, str))


def render_path(root: str, path: Sequence[PathItem]) -> str:
    """``("layouts", 2, "num_blocks")`` under root ``"$"`` -> ``$.layouts[2].num_blocks``."""
    out = root
    for item in path:
        if isinstance(item, int):
            out += f"[{item}]"
        else:
            out = f"{out}.{item}" if out else item
    return out


@attrs.frozen
class Problem:
    """One thing wrong with a configuration: where (a path relative to the object checked) and what."""

    path: tuple[PathItem, ...]
    message: str

    def under(self, *prefix: PathItem) -> Problem:
        return Problem((*prefix, *self.path), self.message)


class KvbmError(Exception):
    """Root of every error kvbm_builder raises on purpose."""


class ConfigError(KvbmError, ValueError):
    """A configuration is invalid. ``errors`` lists every problem found, as ``(path, message)`` pairs."""

    def __init__(self, problems: Iterable[Problem], root: str = "") -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.root = root
        super().__init__(self._summary())

    @property
    def errors(self) -> list[tuple[str, str]]:
        return [(render_path(self.root, p.path), p.message) for p in self.problems]

    def rerooted(self, root: str, *prefix: PathItem) -> ConfigError:
        """The same problems, shown under another root (the loader shows ``$.host_layout...``)."""
        return type(self)([p.under(*prefix) for p in self.problems], root)

    def _summary(self) -> str:
        lines = [f"{path}: {message}" if path else message for path, message in self.errors]
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} problems in the configuration:\n" + "\n".join(f"  {line}" for line in lines)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.problems, self.root))


#: What a problem says of a required field that was never set (upstream's words, after the field's name).
MUST_BE_INITIALIZED = "must be initialized"


class UninitializedFieldError(ConfigError):
    """A required builder field was never set.

    ``missing`` names every missing field; ``errors`` lists them and any other problem of the same ``build()``.
    ``str(err)`` lists every problem; when the first is a missing field its first line is upstream's exact message,
    e.g. `` `worker_id` must be initialized `` (and that is all of it when nothing else is wrong).
    """

    def __init__(self, problems: Iterable[Problem], root: str = "", missing: Sequence[str] = ()) -> None:
        self.missing: tuple[str, ...] = tuple(missing)
        super().__init__(problems, root)

    def _summary(self) -> str:
        first = self.problems[0] if self.problems else None
        if first is None or first.message != MUST_BE_INITIALIZED or not self.missing:
            return super()._summary()
        upstream = f"`{first.path[-1] if first.path else self.missing[0]}` {MUST_BE_INITIALIZED}"
        return upstream if len(self.problems) == 1 else f"{upstream}\n{super()._summary()}"

    def rerooted(self, root: str, *prefix: PathItem) -> ConfigError:
        return UninitializedFieldError([p.under(*prefix) for p in self.problems], root, self.missing)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.problems, self.root, self.missing))


class BuilderConsumedError(KvbmError, RuntimeError):
    """A builder was used after ``build()`` consumed it (owned pattern). Use ``clone()`` before building."""


class LoadError(ConfigError):
    """A configuration document could not be read (file missing, not JSON/TOML/YAML, ...)."""


class RuntimeObjectError(ConfigError, TypeError):
    """A runtime object (memory given as ``storage``, a caller's allocator or NIXL agent, a token, a registry...)
    was asked to go where only data goes: a document (``dump``) or a pickle. Names the field and what to do."""


class RuntimeObjectWarning(UserWarning):
    """``dump()`` left out runtime objects a caller attached (an event manager, an offload filter, a callback):
    a document cannot hold them, so a config loaded from it has none until they are set again in Python."""


class UnknownTierError(KvbmError, LookupError):
    """A tier was asked for that does not exist, or that the configuration does not have; says which exist."""


class MissingDependencyError(KvbmError, ImportError):
    """An optional package a call needs (numpy, torch, cupy) is not installed; says what to install."""


class UsageError(KvbmError, ValueError):
    """The command line was used wrongly (e.g. ``--set`` without ``KEY=VALUE``); the CLI exits 2."""


class LayoutError(KvbmError, ValueError):
    """A layout was asked for a region that does not exist, or given storage that cannot hold it."""


class AllocationError(KvbmError, RuntimeError):
    """Memory or files for a tier could not be allocated. Names the tier and the step that failed."""


class GpuUnavailableError(AllocationError):
    """A device (G1) or pinned (G2) tier was asked for on a machine where CUDA cannot be used."""


class DiskStorageError(AllocationError):
    """The disk tier (G3) file could not be created, sized or opened. Names the path, step and variable."""


class NixlError(KvbmError, RuntimeError):
    """NIXL is missing, or an agent could not be created or could not register a storage."""


class SequenceHashError(KvbmError, ValueError):
    """Tokens or hashes that cannot be hashed as upstream does (a token id outside u32, a hash outside 64 bits)."""


class BlockPoolError(KvbmError, RuntimeError):
    """A block pool was used against its rules. Names the tier and the block."""


class BlockReleasedError(BlockPoolError):
    """A block handle was used after it was released (or registered, for a mutable block), or released twice."""


class PoolExhaustedError(BlockPoolError):
    """A tier has fewer free or evictable blocks than asked for: every other block is in use."""


class PoolClosedError(BlockPoolError):
    """A block pool was used after its manager closed it (its memory is gone)."""


class OffloadError(KvbmError, RuntimeError):
    """An offload or onboard could not start: the manager is closed, cancelled or never came up, a block belongs to
    another manager or was released, or a tier has no tier to move to; or an offload filter was started twice.
    Names the tiers. (Failures while moving are TransferErrors.)"""


class MetricsError(KvbmError, ValueError):
    """Metrics were given something they cannot count: a negative count, an unknown skip reason, a bad window."""


class MetricsRegistryError(MetricsError):
    """A Prometheus registry already holds KVBM's metric names (another manager's metrics, or the user's own)."""


class MetricsServerError(KvbmError, RuntimeError):
    """``/metrics`` could not be served: the port is in use or the address cannot be bound. Names both."""

    def __init__(self, message: str, *, host: str, port: int) -> None:
        super().__init__(message)
        self.host = host
        self.port = port

    def __reduce__(self) -> tuple[object, ...]:
        return (_metrics_server_error, (str(self), self.host, self.port))


def _metrics_server_error(message: str, host: str, port: int) -> MetricsServerError:
    return MetricsServerError(message, host=host, port=port)


class StorageClosedError(KvbmError, ValueError):
    """A storage was used after ``close()``: its memory or file is gone."""


class StorageBufferError(KvbmError, TypeError):
    """A storage's read or write was given something that is not a contiguous (writable, to read into) buffer."""


class DiskReservationWarning(UserWarning):
    """The file system could not reserve the disk tier's space: the file was truncated to size instead."""


class LayoutIndexError(LayoutError, IndexError):
    """A block, layer or outer index outside ``0 .. bound - 1``; ``axis``, ``index`` and ``bound`` say which."""

    def __init__(self, axis: str, index: int, bound: int) -> None:
        self.axis, self.index, self.bound = axis, index, bound
        if index < 0:
            why = f"{axis} index {show(index)} is negative (negative indices do not count from the end)"
        else:
            why = f"{axis} index {show(index)} is out of range: the layout has {bound} {axis}s"
        super().__init__(f"{why}; valid {axis} indices are 0..{bound - 1}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.axis, self.index, self.bound))


class StorageTooSmallError(LayoutError):
    """A given storage cannot hold its part of the layout; ``storage_index``, ``size`` and ``required`` say how."""

    def __init__(self, message: str, storage_index: int, size: int, required: int) -> None:
        self.storage_index, self.size, self.required = storage_index, size, required
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.storage_index, self.size, self.required))


class NixlDeregistrationError(NixlError):
    """NIXL could not deregister some storages. They are still registered with the agent, so their memory must
    not be freed (for a file, NIXL's devId is the descriptor, which the system would hand out again).

    ``still_registered`` lists those storages, newest first; ``registrations`` what the registry still holds for
    them. The registry keeps them and tries again on the next :meth:`NixlRegistry.close` (``registry.close()``).
    """

    def __init__(
        self, message: str, registrations: Iterable[NixlRegistration] = (), registry: NixlRegistry | None = None
    ) -> None:
        super().__init__(message)
        self.registrations: tuple[NixlRegistration, ...] = tuple(registrations)
        self.still_registered: tuple[Storage, ...] = tuple(r.storage for r in self.registrations)
        #: the registry that holds them: its close() retries
        self.registry = registry


class ReleaseError(AllocationError):
    """``KvBlockManager.close()`` could not release everything.

    ``unreleased`` lists the storages kept (newest first): memory NIXL still has registered (freeing it would pull
    it from under NIXL) and storages whose own release failed (e.g. a disk file that could not be removed).
    ``manager`` stays open; calling its ``close()`` again retries exactly those. ``errors`` holds every error met.
    """

    def __init__(
        self, message: str, unreleased: Sequence[Storage], manager: KvBlockManager, errors: Sequence[BaseException]
    ) -> None:
        super().__init__(message)
        self.unreleased: tuple[Storage, ...] = tuple(unreleased)
        self.manager = manager
        self.errors: tuple[BaseException, ...] = tuple(errors)


class TransferError(KvbmError, RuntimeError):
    """A transfer failed, or was refused: no block it names may be trusted on the target side.

    ``src_tier`` / ``dst_tier`` and ``src_blocks`` / ``dst_blocks`` say what was being moved; ``step`` says what
    failed (``validate``, ``check memory``, ``copy kernel``, ``cudaMemcpyAsync``, ``read disk``, ``write disk``,
    ``cancelled``, ``closed``, ...). The cause, when there is one, is chained (``__cause__``).
    """

    def __init__(
        self,
        message: str,
        *,
        src_tier: Tier | None,
        dst_tier: Tier | None,
        src_blocks: Sequence[int] = (),
        dst_blocks: Sequence[int] = (),
        step: str,
    ) -> None:
        self.src_tier, self.dst_tier = src_tier, dst_tier
        self.src_blocks: tuple[int, ...] = tuple(src_blocks)
        self.dst_blocks: tuple[int, ...] = tuple(dst_blocks)
        self.step = step
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (str(self), self.src_tier, self.dst_tier, self.src_blocks, self.dst_blocks, self.step))


def _rebuild(
    message: str,
    src_tier: Tier | None,
    dst_tier: Tier | None,
    src_blocks: tuple[int, ...],
    dst_blocks: tuple[int, ...],
    step: str,
) -> TransferError:
    return TransferError(
        message, src_tier=src_tier, dst_tier=dst_tier, src_blocks=src_blocks, dst_blocks=dst_blocks, step=step
    )
