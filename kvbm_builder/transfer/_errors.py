"""What a transfer reports: :class:`TransferError` when it fails, :class:`TransferRecord` when it finishes."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from ..config.protocols import StorageKind, Tier
from ..errors import KvbmError

__all__ = ["TransferError", "TransferRecord"]


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


@attrs.frozen
class TransferRecord:
    """One finished ``submit()``: what moved, how much, how long from the call to the data being in place.

    ``error`` is None when every byte arrived; otherwise the :class:`TransferError` its future raised.
    ``method`` says how the bytes went (``kernel``, ``memcpy``, ``staged``, ``io``, ``host``; several joined by
    ``+`` when batches differed).
    """

    src_tier: Tier
    dst_tier: Tier
    src_kind: StorageKind
    dst_kind: StorageKind
    num_blocks: int
    nbytes: int
    seconds: float
    error: BaseException | None = None
    method: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def gbps(self) -> float:
        """Decimal gigabytes per second, submit to completion."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
