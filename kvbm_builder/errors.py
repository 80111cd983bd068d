"""One exception tree, rooted in :class:`KvbmError`.

Every error names what it is about (a field, a tier, a path or a variable) and says what to do.
Configuration problems are data: a :class:`ConfigError` carries every :class:`Problem` found in one
``build()`` or one ``load()``, each with the path of the value it is about.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

__all__ = [
    "AllocationError",
    "BlockPoolError",
    "BlockReleasedError",
    "BuilderConsumedError",
    "ConfigError",
    "DiskStorageError",
    "GpuUnavailableError",
    "KvbmError",
    "LayoutError",
    "LoadError",
    "MetricsError",
    "MetricsRegistryError",
    "MetricsServerError",
    "NixlError",
    "OffloadError",
    "PoolClosedError",
    "PoolExhaustedError",
    "Problem",
    "SequenceHashError",
    "UninitializedFieldError",
]

PathItem = str | int


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


class UninitializedFieldError(ConfigError):
    """A required builder field was never set.

    ``str(err)`` is exactly upstream's message for the first missing field (declaration order),
    e.g. `` `worker_id` must be initialized ``; ``missing`` names them all and ``errors`` also lists
    any other problem found in the same ``build()``.
    """

    def __init__(self, problems: Iterable[Problem], root: str = "", missing: Sequence[str] = ()) -> None:
        self.missing: tuple[str, ...] = tuple(missing)
        super().__init__(problems, root)

    def _summary(self) -> str:
        return f"`{self.missing[0]}` must be initialized" if self.missing else super()._summary()

    def rerooted(self, root: str, *prefix: PathItem) -> ConfigError:
        return UninitializedFieldError([p.under(*prefix) for p in self.problems], root, self.missing)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.problems, self.root, self.missing))


class BuilderConsumedError(KvbmError, RuntimeError):
    """A builder was used after ``build()`` consumed it (owned pattern). Use ``clone()`` before building."""


class LoadError(ConfigError):
    """A configuration document could not be read (file missing, not JSON/TOML/YAML, ...)."""


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
    """An offload or onboard could not start: the manager is closed or cancelled, a block belongs to another manager
    or was released, or a tier has no tier to move to. Names the tiers. (Failures while moving are TransferErrors.)"""


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
