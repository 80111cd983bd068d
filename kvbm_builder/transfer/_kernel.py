"""How the copy kernels are launched (no cupy here: a configuration can be made on any machine)."""

from __future__ import annotations

__all__ = ["KernelConfig"]


class KernelConfig:
    """How the copy kernels are launched; the defaults are what ``benchmarks/bench_transfer.py`` found fastest."""

    __slots__ = ("bounce_bytes", "max_grid", "piece_bytes", "table_on_device", "threads", "unroll")

    def __init__(
        self,
        *,
        piece_bytes: int = 64 * 2**10,
        threads: int = 256,
        unroll: int = 4,
        max_grid: int = 0,
        table_on_device: bool = True,
        bounce_bytes: int = 64 * 2**20,
    ) -> None:
        self.piece_bytes = piece_bytes  # a thread block copies at most this much at a time
        self.threads = threads
        self.unroll = unroll
        self.max_grid = max_grid  # 0: one thread block per piece; else a grid-stride loop over at most this many
        # copy parameters / table to GPU memory first (one small cudaMemcpyAsync; then every thread block reads them
        # from L2), or let the kernel read them from mapped pinned memory over PCIe: the first measured slightly faster
        self.table_on_device = table_on_device
        # method "bounce": the most bytes gathered in GPU memory per DMA round. Smaller chunks overlap kernel and DMA
        # inside a batch but cost two cross-stream event waits each; on an H200 one chunk per 16-block batch
        # (batches overlap each other on the slots' streams) measured best
        self.bounce_bytes = bounce_bytes

    def __repr__(self) -> str:
        return (
            f"KernelConfig(piece_bytes={self.piece_bytes}, threads={self.threads}, unroll={self.unroll}, "
            f"max_grid={self.max_grid}, table_on_device={self.table_on_device}, bounce_bytes={self.bounce_bytes})"
        )
