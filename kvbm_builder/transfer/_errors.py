"""What a transfer reports: :class:`TransferError` when it fails, :class:`TransferRecord` when it finishes."""

from __future__ import annotations

import attrs

from ..config.protocols import StorageKind, Tier
from ..errors import TransferError

__all__ = ["TransferError", "TransferRecord"]


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
