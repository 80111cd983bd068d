"""Moving the bytes of blocks between layouts: GPU, pinned or system host memory, and disk, in any combination.

- :class:`TransferEngine`: ``submit(src, src_blocks, dst, dst_blocks)`` returns a :class:`TransferFuture` (also
  awaitable) at once; ``copy(...)`` waits; listeners receive a :class:`TransferRecord` per finished submit.
- :class:`TransferError`: a transfer that failed or was refused, naming the tiers, the blocks and the step.
- :func:`region_table`: the coalesced (source, target, size) runs of a transfer, pure arithmetic.
- :class:`KernelConfig`: how the GPU copy kernels are launched (the defaults are the measured best).

Importing this package imports neither numpy nor cupy; they are imported by the first transfer that needs them.
"""

from typing import TYPE_CHECKING

from ._engine import TransferEngine
from ._errors import TransferError, TransferRecord
from ._future import TransferFuture
from ._kernel import KernelConfig

if TYPE_CHECKING:
    from ._table import RegionTable as RegionTable
    from ._table import region_table as region_table

__all__ = [
    "KernelConfig",
    "RegionTable",
    "TransferEngine",
    "TransferError",
    "TransferFuture",
    "TransferRecord",
    "region_table",
]


def __getattr__(name: str) -> object:
    if name in ("RegionTable", "region_table"):  # numpy is imported with them
        from . import _table

        return getattr(_table, name)
    raise AttributeError(f"module 'kvbm_builder.transfer' has no attribute {name!r}")
