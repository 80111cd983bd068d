"""``TransferEngine``: moves the bytes of blocks between two layouts, in batches, without blocking its caller.

A ``submit()`` checks its arguments, splits the blocks into batches of ``max_batch_blocks`` and returns a
:class:`TransferFuture` at once; at most ``max_concurrent`` batches are in flight on each *lane*, the rest wait in
order. Batches that copy with the GPU (``device``, and ``staged`` through the GPU) and batches the CPU moves alone
(``host``, ``io``, disk <-> disk) have a lane each: their slots are separate resources (CUDA streams, I/O threads),
so a slow disk write never holds a slot a GPU copy waits for. How a batch moves depends on the two storage kinds
(its *route*):

- ``device``: GPU memory <-> GPU or pinned host memory. One launch of the batched copy kernel over the batch's
  table (or one ``cudaMemcpyAsync`` per run when the runs are few and large), on the slot's own non-blocking
  stream; a completion thread waits on the batch's CUDA event and finishes it.
- ``host``: host <-> host memory, ``memmove`` on worker threads.
- ``io``: host memory <-> disk, positional I/O on worker threads.
- ``staged``: GPU <-> pageable memory or disk, and disk <-> disk: through the slot's two staging buffers in
  chunks, one chunk copied by the GPU while the CPU reads or writes the other.

A batch that fails stops the batches of its submit that have not started; the future fails (with a
:class:`TransferError` naming the tiers, the blocks and the step) only once every batch it started has finished,
so no byte moves after the failure is reported. It never reports success for a copy that did not complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any

import attrs

from ..config.layout import FullyContiguous
from ..config.protocols import StorageKind
from ..config.runtime import CancellationToken
from ..errors import ConfigError, GpuUnavailableError, Problem
from ..layout import Layout, LayoutSpec
from ._errors import TransferError, TransferRecord
from ._future import TransferFuture
from ._kernel import KernelConfig

if TYPE_CHECKING:
    from ._cuda import CudaContext, Lane, Slot
    from ._hostio import IoOp, StepError

__all__ = ["TransferEngine"]

log = logging.getLogger("kvbm_builder.transfer")

Listener = Callable[[TransferRecord], None]

#: Layouts contiguous on both sides over at least this many bytes at a time (FullyContiguous to FullyContiguous)
#: go by the copy engine, all of a batch's runs in one cuMemcpyBatchAsync: 0.93 / 0.97 of the PCIe ceiling at 64 /
#: 256 blocks of 4 MiB on an H200, where the kernel reaches 0.90 / 0.94; runs of 64 KiB are too small for it (0.6).
#: benchmarks/RESULTS.md.
MEMCPY_MIN_RUN_BYTES = 2**20
#: Bytes of one staging buffer (two per slot): the chunk the GPU copies while the CPU works on the other one.
STAGING_BYTES = 16 * 2**20
#: Threads that run the I/O operations of host and disk batches; disks want several requests in flight.
IO_THREADS = 16
#: How device batches with many small regions move to or from pinned memory, as benchmarks/bench_transfer.py
#: measured them on an H200 (4 MiB blocks of 64 KiB regions, benchmarks/RESULTS.md). A submit of several batches
#: goes ``bounce``: the kernel gathers (scatters) the device regions in GPU scratch and the copy engine moves whole
#: host blocks, while the other slots' batches overlap (0.97 at 256 blocks each way, against 0.93 / 0.91 for the
#: kernel reading or writing pinned memory over PCIe). A single batch cannot overlap its DMA with anything: the
#: kernel, as fast there (0.87 against 0.88 offload, 0.85 against 0.86 onboard at 16 blocks) with no scratch.
#: Device to device uses the kernel.
SCATTERED_SEVERAL_BATCHES = "bounce"
SCATTERED_ONE_BATCH = "kernel"
_COPY_METHODS = ("auto", "kernel", "table", "memcpy", "bounce")
_STEPS = {"kernel": "copy kernel", "table": "copy kernel", "memcpy": "cudaMemcpyAsync", "bounce": "bounce copy"}
_HOST_KINDS = (StorageKind.PINNED, StorageKind.SYSTEM)


class _Job:
    """One submit: its layouts, ids, future and what its batches found."""

    __slots__ = (
        "batches",
        "deltas",
        "dst",
        "dst_blocks",
        "error",
        "fds",
        "future",
        "lane",
        "launched",
        "method",
        "owned",
        "remaining",
        "route",
        "sides",
        "src",
        "src_blocks",
        "started",
    )

    def __init__(self, src: Layout, s_ids: Any, dst: Layout, d_ids: Any, route: str) -> None:
        self.src, self.dst = src, dst
        self.src_blocks, self.dst_blocks = s_ids, d_ids
        self.route = route
        self.started = time.perf_counter()
        self.future = TransferFuture()
        self.future.set_running_or_notify_cancel()  # copies may start at once: cancel() cannot take it back
        self.remaining = 0
        self.batches = 0
        self.error: tuple[_Batch, StepError] | None = None
        self.method = route  # device batches: kernel, table, memcpy or bounce (chosen once per submit)
        kinds = (src.storages[0].kind, dst.storages[0].kind)
        self.lane = "gpu" if route == "device" or StorageKind.DEVICE in kinds else "cpu"
        self.deltas: tuple[Any, Any] = (None, None)
        self.sides: tuple[Any, Any] = (None, None)  # GpuSide of each layout (device routes)
        self.owned = False  # copy(): the calling thread finishes the device batches itself
        self.launched: deque[tuple[_Batch, Any, str]] = deque()  # owned device batches queued on the GPU
        self.fds: dict[str, list[int]] = {}  # "src"/"dst" -> duplicated descriptors of a disk layout

    @property
    def src_kind(self) -> StorageKind:
        return self.src.storages[0].kind

    @property
    def dst_kind(self) -> StorageKind:
        return self.dst.storages[0].kind

    def fail(self, batch: _Batch, error: StepError) -> None:
        if self.error is None:
            self.error = (batch, error)


class _Batch:
    __slots__ = ("d_ids", "job", "number", "s_ids", "slot")

    def __init__(self, job: _Job, number: int, s_ids: Any, d_ids: Any) -> None:
        self.job, self.number, self.s_ids, self.d_ids = job, number, s_ids, d_ids
        self.slot = -1


class TransferEngine:
    """Moves blocks between :class:`~kvbm_builder.layout.Layout` s of any kind (device, pinned, system, disk).

    ``max_batch_blocks`` (``DYN_KVBM_MAX_TRANSFER_BATCH_SIZE``) blocks form one batch, at most ``max_concurrent``
    (``DYN_KVBM_MAX_CONCURRENT_TRANSFERS``) batches are in flight on each lane (GPU copies; host and disk copies).
    ``device_id`` is the GPU whose streams copy
    (by default the GPU of the first device layout submitted). Once ``cancellation_token`` is cancelled, or
    ``close()`` is called, nothing new starts and transfers not finished fail. ``listeners`` receive a
    :class:`TransferRecord` for every finished submit, success or failure, on the engine's threads.

    ``device_copy`` forces the copy method of device batches (``"kernel"``, ``"memcpy"`` or ``"bounce"``;
    ``"auto"`` picks per batch). ``staging_bytes`` sizes each of the two staging buffers of a slot;
    ``io_threads`` the I/O pool; ``kernel`` (a ``KernelConfig``) how the copy kernel is launched.
    """

    def __init__(
        self,
        *,
        device_id: int | None = None,
        max_batch_blocks: int = 16,
        max_concurrent: int = 4,
        cancellation_token: CancellationToken | None = None,
        listeners: Sequence[Listener] = (),
        device_copy: str = "auto",
        staging_bytes: int = STAGING_BYTES,
        io_threads: int = IO_THREADS,
        kernel: KernelConfig | None = None,
    ) -> None:
        problems = [
            Problem((name,), f"must be a whole number >= 1, got {value!r}")
            for name, value in (
                ("max_batch_blocks", max_batch_blocks),
                ("max_concurrent", max_concurrent),
                ("staging_bytes", staging_bytes),
                ("io_threads", io_threads),
            )
            if isinstance(value, bool) or not isinstance(value, int) or value < 1
        ]
        if device_id is not None and (isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0):
            problems.append(Problem(("device_id",), f"must be a GPU ordinal >= 0 or None, got {device_id!r}"))
        if device_copy not in _COPY_METHODS:
            problems.append(
                Problem(("device_copy",), f"must be one of {', '.join(_COPY_METHODS)}, got {device_copy!r}")
            )
        if cancellation_token is not None and not isinstance(cancellation_token, CancellationToken):
            problems.append(Problem(("cancellation_token",), "must be a kvbm_builder.CancellationToken or None"))
        if problems:
            raise ConfigError(problems, "TransferEngine")
        self.max_batch_blocks = max_batch_blocks
        self.max_concurrent = max_concurrent
        self.device_copy = device_copy
        self.staging_bytes = staging_bytes
        self.io_threads = io_threads
        self._device_id = device_id
        self._kernel_config = kernel
        self._token = cancellation_token
        self._listeners: list[Listener] = list(listeners)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._launched = threading.Condition(self._lock)  # an owned job got a device batch queued, or finished
        self._pending: dict[str, deque[_Batch]] = {"gpu": deque(), "cpu": deque()}  # by lane, in order
        self._inflight = 0
        self._lane_inflight: dict[str, int] = {"gpu": 0, "cpu": 0}
        self._free_slots: dict[str, list[int]] = {lane: list(range(max_concurrent)) for lane in self._pending}
        self._closed = False
        self._close_done = threading.Event()
        self._closer: threading.Thread | None = None
        self._cuda: CudaContext | None = None
        self._host_staging: dict[int, Any] = {}  # slot -> SystemStorage (disk <-> disk)
        self._layout_sides: dict[int, tuple[Layout, Any, Any]] = {}  # id(layout) -> (layout, delta, GpuSide)
        self._layout_infos: dict[int, tuple[Layout, StorageKind, frozenset[int]]] = {}
        self._workers: ThreadPoolExecutor | None = None
        self._io: ThreadPoolExecutor | None = None
        self._completions: queue.SimpleQueue[tuple[_Batch, Slot, str] | None] = queue.SimpleQueue()
        self._completion_thread: threading.Thread | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **kwargs: Any) -> TransferEngine:
        """An engine with ``DYN_KVBM_MAX_TRANSFER_BATCH_SIZE`` and ``DYN_KVBM_MAX_CONCURRENT_TRANSFERS`` applied
        (bad values raise the loader's ConfigError naming the variable); other arguments as for the constructor."""
        from ..config.settings import settings_from_env

        settings = settings_from_env(environ)
        kwargs.setdefault("max_batch_blocks", settings.max_transfer_batch_size)
        kwargs.setdefault("max_concurrent", settings.max_concurrent_transfers)
        return cls(**kwargs)

    # --- public API ----------------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def staging_bytes_held(self) -> int:
        """Bytes of staging buffers the engine holds now (0 after ``close()``)."""
        held = sum(int(s.size) for s in self._host_staging.values())
        return held + (self._cuda.staging_bytes() if self._cuda is not None else 0)

    def submit(self, src: Layout, src_blocks: Sequence[int], dst: Layout, dst_blocks: Sequence[int]) -> TransferFuture:
        """Start moving ``src_blocks[i]`` of ``src`` to ``dst_blocks[i]`` of ``dst``; returns at once.

        Bad arguments (layouts of another shape, ids out of range, a target twice), a closed engine, a cancelled
        token or unusable memory raise :class:`TransferError` here; failures while copying come through the
        future."""
        return self._submit(src, src_blocks, dst, dst_blocks, owned=False).future

    def _submit(
        self, src: Layout, src_blocks: Sequence[int], dst: Layout, dst_blocks: Sequence[int], *, owned: bool
    ) -> _Job:
        from ._table import check_blocks

        s_ids, d_ids = check_blocks(src, src_blocks, dst, dst_blocks)
        src_kind, dst_kind = self._layout_info(src, "source")[0], self._layout_info(dst, "target")[0]
        job = _Job(src, s_ids, dst, d_ids, _route(src_kind, dst_kind))
        job.owned = owned and job.route == "device"
        reason = self._stop_reason()
        if reason is not None:
            raise self._refusal(job, reason, f"the engine is {reason}; make a new TransferEngine")
        try:
            self._prepare(job)
        except BaseException:
            _close_fds(job)
            raise
        n = int(s_ids.size)
        step = self.max_batch_blocks
        batches = [_Batch(job, k, s_ids[i : i + step], d_ids[i : i + step]) for k, i in enumerate(range(0, n, step))]
        job.batches = job.remaining = len(batches)
        with self._lock:
            closed = self._closed
            if not closed:
                self._pending[job.lane].extend(batches)
        if closed:
            _close_fds(job)
            raise self._refusal(job, "closed", "the engine was closed; make a new TransferEngine")
        if not batches:
            self._complete(job)
        else:
            self._pump()
        return job

    def copy(self, src: Layout, src_blocks: Sequence[int], dst: Layout, dst_blocks: Sequence[int]) -> TransferRecord:
        """``submit(...).result()``: returns once every byte is in place, or raises the TransferError.

        For GPU batches the calling thread waits on their CUDA events and finishes them itself, so no other
        thread has to wake up before it can return."""
        job = self._submit(src, src_blocks, dst, dst_blocks, owned=True)
        if job.owned:
            try:
                while True:
                    with self._lock:
                        while not job.launched and not job.future.done():
                            self._launched.wait()
                        if not job.launched:
                            break
                        item = job.launched.popleft()
                    self._finish_device(*item)
            except BaseException:  # interrupted: whatever is on the GPU is left to the completion thread
                with self._lock:
                    job.owned = False
                    items = list(job.launched)
                    job.launched.clear()
                for item in items:
                    self._completion_queue().put(item)
                raise
        return job.future.result()

    def close(self) -> None:
        """Stop: batches not started fail (step ``closed``), batches in flight finish or fail, then the engine's
        threads, streams and buffers are released. Idempotent; safe from a listener (it then returns without
        waiting for the batches in flight)."""
        with self._lock:
            first = not self._closed
            self._closed = True
            skipped = [batch for pending in self._pending.values() for batch in pending]
            for pending in self._pending.values():
                pending.clear()
            finished = []
            for batch in skipped:
                job = batch.job
                job.fail(batch, _step_error("closed", "the engine was closed before this batch started"))
                job.remaining -= 1
                if job.remaining == 0:
                    finished.append(job)
        for job in finished:
            self._complete(job)
        inside = threading.current_thread().name.startswith("kvbm-transfer")
        if not first:
            if not inside:
                self._close_done.wait()
                closer = self._closer
                if closer is not None and closer is not threading.current_thread():
                    closer.join()
            return
        if inside:  # a listener: the batch it runs in is still in flight, so the waiting happens elsewhere
            self._closer = threading.Thread(target=self._release, name="kvbm-transfer-close", daemon=True)
            self._closer.start()
        else:
            self._release()

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        waiting = sum(len(pending) for pending in self._pending.values())
        state = "closed" if self._closed else f"{self._inflight} batches in flight, {waiting} waiting"
        return (
            f"TransferEngine(max_batch_blocks={self.max_batch_blocks}, max_concurrent={self.max_concurrent}, {state})"
        )

    # --- submit --------------------------------------------------------------------------------------------

    def _stop_reason(self) -> str | None:
        if self._closed:
            return "closed"
        if self._token is not None and self._token.is_cancelled():
            return "cancelled"
        return None

    def _refusal(self, job: _Job, step: str, why: str, cause: BaseException | None = None) -> TransferError:
        error = TransferError(
            f"{_what(job)}: {why}",
            src_tier=job.src_kind.tier,
            dst_tier=job.dst_kind.tier,
            src_blocks=job.src_blocks.tolist(),
            dst_blocks=job.dst_blocks.tolist(),
            step=step,
        )
        error.__cause__ = cause
        return error

    def _prepare(self, job: _Job) -> None:
        """Check the memory of both layouts, take what the job needs (disk descriptors, the CUDA context)."""
        from ._hostio import StepError

        for side, layout in (("source", job.src), ("target", job.dst)):
            for i, storage in enumerate(layout.storages):
                if getattr(storage, "closed", False):
                    raise self._refusal(job, "validate", f"{side} storage {i} ({storage!r}) is closed")
        for side, layout in (("src", job.src), ("dst", job.dst)):
            if layout.storages[0].kind is StorageKind.DISK:
                fds = job.fds.setdefault(side, [])
                for storage in layout.storages:
                    try:
                        # our own descriptor: a storage closed meanwhile can never make us write to a reused number
                        fds.append(os.dup(storage.fd))  # type: ignore[attr-defined]
                    except OSError as exc:
                        raise self._refusal(
                            job,
                            "open disk",
                            f"the file descriptor {storage.fd} of {storage!r} is not open ({exc.strerror}); "  # type: ignore[attr-defined]
                            "was the disk storage closed, or its fd closed by someone else?",
                            exc,
                        ) from exc
        if job.route in ("device", "staged") and StorageKind.DEVICE in (job.src_kind, job.dst_kind):
            cuda = self._cuda_for(job)
            try:
                if cuda.broken is not None:
                    raise StepError(
                        "cuda context",
                        f"an earlier copy left the CUDA context unusable ({cuda.broken}); restart the process",
                    )
                (d_src, side_src), (d_dst, side_dst) = (
                    self._gpu_side(cuda, job.src, "source"),
                    self._gpu_side(cuda, job.dst, "target"),
                )
                job.deltas, job.sides = (d_src, d_dst), (side_src, side_dst)
                if job.route == "device":
                    several = int(job.src_blocks.size) > self.max_batch_blocks
                    job.method = self._device_method(
                        job.src, job.dst, job.deltas, job.sides, bounce=True, several_batches=several
                    )
            except StepError as exc:
                raise self._refusal(job, exc.step, str(exc), exc.__cause__) from exc

    def _gpu_side(self, cuda: CudaContext, layout: Layout, side: str) -> tuple[Any, Any]:
        """(delta, GpuSide) of a layout: what to add to its addresses for the kernel (0, one int per storage, or
        None when the GPU cannot address it: no kernel then) and its strides for the GPU. Checked once per layout
        object (a tier's layout is submitted again and again)."""
        from ._cuda import GpuSide

        cached = self._layout_sides.get(id(layout))
        if cached is not None and cached[0] is layout:
            return cached[1], cached[2]
        kind = layout.storages[0].kind
        delta: Any = None
        if kind in (StorageKind.DEVICE, StorageKind.PINNED):
            deltas = [cuda.device_delta(s, f"{side} storage {i} ({s!r})") for i, s in enumerate(layout.storages)]
            if any(d is None for d in deltas):
                delta = None
            elif all(d == deltas[0] for d in deltas):
                delta = deltas[0]
            else:
                import numpy as np

                delta = np.asarray(deltas, dtype=np.int64)
        gpu = GpuSide.of(layout, delta)
        with self._lock:
            if len(self._layout_sides) >= 64:  # a few tiers' layouts, plus staging: never many
                self._layout_sides.clear()
            self._layout_infos.clear()
            self._layout_sides[id(layout)] = (layout, delta, gpu)
        return delta, gpu

    def _device_method(
        self,
        src: Layout,
        dst: Layout,
        deltas: tuple[Any, Any],
        sides: tuple[Any, Any],
        *,
        bounce: bool,
        several_batches: bool = False,
    ) -> str:
        """How device batches between these layouts move: the forced ``device_copy``, else ``memcpy`` when both
        sides are contiguous over at least ``MEMCPY_MIN_RUN_BYTES`` at a time, else by direction (see above)."""
        from ._cuda import chunk_shape

        kinds = (src.storages[0].kind, dst.storages[0].kind)
        pinned = sides[1] if kinds[1] is StorageKind.PINNED else sides[0] if kinds[0] is StorageKind.PINNED else None
        can_bounce = bounce and pinned is not None and not pinned.separate and StorageKind.DEVICE in kinds
        can_kernel = deltas[0] is not None and deltas[1] is not None
        choice = self.device_copy
        if choice == "auto":
            if chunk_shape(sides[0], sides[1], src.spec)[2] >= MEMCPY_MIN_RUN_BYTES:
                return "memcpy"
            choice = SCATTERED_SEVERAL_BATCHES if several_batches else SCATTERED_ONE_BATCH
        if choice == "bounce" and not can_bounce:
            choice = "kernel"
        if choice in ("kernel", "table") and not can_kernel:
            choice = "bounce" if can_bounce else "memcpy"
        return choice

    def _layout_info(self, layout: Layout, side: str) -> tuple[StorageKind, frozenset[int]]:
        """(storage kind, GPUs of its device storages) of a layout, worked out once per layout object."""
        cached = self._layout_infos.get(id(layout))
        if cached is not None and cached[0] is layout:
            return cached[1], cached[2]
        kind = _kind_of(layout, side)
        devices = frozenset(
            int(s.device_id)  # type: ignore[attr-defined]
            for s in layout.storages
            if s.kind is StorageKind.DEVICE
        )
        with self._lock:
            if len(self._layout_infos) >= 64:
                self._layout_infos.clear()
            self._layout_infos[id(layout)] = (layout, kind, devices)
        return kind, devices

    def _cuda_for(self, job: _Job) -> CudaContext:
        devices = self._layout_info(job.src, "source")[1] | self._layout_info(job.dst, "target")[1]
        with self._lock:
            if self._cuda is not None:
                device = self._cuda.device_id
            else:
                device = self._device_id if self._device_id is not None else min(devices)
        if devices - {device}:
            raise self._refusal(
                job,
                "validate",
                f"device storages on GPU(s) {sorted(devices)} but this engine copies on GPU {device}; "
                "use one engine per GPU",
            )
        try:
            return self._context(device, job.src_kind.tier.words)
        except GpuUnavailableError as exc:
            raise self._refusal(job, "cuda context", str(exc), exc) from exc

    def prepare_gpu(self, device_id: int | None = None) -> None:
        """Load the copy kernels and make the streams on GPU ``device_id`` (the engine's, else 0) now, so that the
        first device transfer does not pay for it (tens of milliseconds). The manager calls it at bring-up when it
        has a device tier; raises :class:`~kvbm_builder.errors.GpuUnavailableError` when CUDA cannot be used."""
        device = device_id if device_id is not None else self._device_id
        self._context(device if device is not None else 0, "the transfer engine")

    def _context(self, device: int, who: str) -> CudaContext:
        with self._lock:
            if self._cuda is None:
                from ..storage._cuda import require_cuda

                require_cuda(who, device, "Device transfers need a GPU")
                from ._cuda import CudaContext

                self._cuda = CudaContext(device, self.max_concurrent, self._kernel_config or KernelConfig())
            return self._cuda

    # --- scheduling ----------------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start waiting batches while fewer than ``max_concurrent`` of their lane are in flight."""
        while True:
            finished: _Job | None = None
            with self._lock:
                for lane, pending in self._pending.items():
                    if pending and self._lane_inflight[lane] < self.max_concurrent:
                        break
                else:
                    return
                batch = pending.popleft()
                job = batch.job
                reason = self._stop_reason()
                if job.error is None and reason is not None:
                    job.fail(batch, _step_error(reason, f"the transfer was {reason} before this batch started"))
                if job.error is not None:  # its submit already failed: do not start the rest
                    job.remaining -= 1
                    finished = job if job.remaining == 0 else None
                    launch = False
                else:
                    self._inflight += 1
                    self._lane_inflight[lane] += 1
                    batch.slot = self._free_slots[lane].pop()
                    launch = True
            if not launch:
                if finished is not None:
                    self._complete(finished)
                continue
            try:
                self._start(batch)
            except BaseException as exc:
                self._done(batch, _as_step_error(exc), pump=False)

    def _start(self, batch: _Batch) -> None:
        route = batch.job.route
        if route == "device":
            self._start_device(batch)
            return
        with self._lock:
            if self._workers is None:
                # the CPU lane's batches, and the GPU lane's staged ones, may all run at once
                self._workers = ThreadPoolExecutor(2 * self.max_concurrent, thread_name_prefix="kvbm-transfer")
            workers = self._workers
        workers.submit(self._run_batch, batch)

    def _done(self, batch: _Batch, error: StepError | None, *, pump: bool = True) -> None:
        """A started batch finished (``error`` None) or failed."""
        job = batch.job
        with self._lock:
            self._inflight -= 1
            self._lane_inflight[job.lane] -= 1
            self._free_slots[job.lane].append(batch.slot)
            if error is not None:
                job.fail(batch, error)
            job.remaining -= 1
            finished = job.remaining == 0
            if self._inflight == 0:
                self._idle.notify_all()
        if pump:  # the next waiting batch starts first: a caller's completion work never leaves a slot idle
            self._pump()
        if finished:
            self._complete(job)

    def _complete(self, job: _Job) -> None:
        _close_fds(job)
        seconds = time.perf_counter() - job.started
        error: TransferError | None = None
        if job.error is not None:
            batch, cause = job.error
            n = int(job.src_blocks.size)
            where = (
                f"batch {batch.number + 1} of {job.batches} (source blocks {_ids(batch.s_ids)} -> target blocks "
                f"{_ids(batch.d_ids)})"
                if job.batches > 1
                else f"source blocks {_ids(batch.s_ids)} -> target blocks {_ids(batch.d_ids)}"
            )
            error = TransferError(
                f"{_what(job)} failed at step '{cause.step}' in {where}: {cause}; none of the {n} target blocks "
                "may be trusted",
                src_tier=job.src_kind.tier,
                dst_tier=job.dst_kind.tier,
                src_blocks=job.src_blocks.tolist(),
                dst_blocks=job.dst_blocks.tolist(),
                step=cause.step,
            )
            error.__cause__ = cause.__cause__ if cause.__cause__ is not None else cause
        spec = job.src.spec
        record = TransferRecord(
            src_tier=job.src_kind.tier,
            dst_tier=job.dst_kind.tier,
            src_kind=job.src_kind,
            dst_kind=job.dst_kind,
            num_blocks=int(job.src_blocks.size),
            nbytes=int(job.src_blocks.size) * spec.num_layers * spec.outer_dim * spec.region_bytes,
            seconds=seconds,
            error=error,
            method=job.method,
        )
        if error is None:
            job.future.set_result(record)
        else:
            job.future.set_exception(error)
        if job.owned:
            with self._lock:
                self._launched.notify_all()
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(record)
            except Exception:
                log.exception("a transfer listener raised; the transfer itself %s", "failed" if error else "succeeded")

    # --- device batches ------------------------------------------------------------------------------------

    def _start_device(self, batch: _Batch) -> None:
        job = batch.job
        cuda = self._cuda
        assert cuda is not None
        slot = cuda.slots[batch.slot]
        method = job.method
        try:
            self._enqueue(cuda, slot, slot.lanes[0], method, job.src, batch.s_ids, job.dst, batch.d_ids, job)
        except BaseException:
            cuda.synchronize(slot)  # what was queued before the failure has run: nothing moves after we report
            raise
        item = (batch, slot, _STEPS[method])
        with self._lock:
            if job.owned:
                job.launched.append(item)
                self._launched.notify_all()
                return
        self._completion_queue().put(item)

    def _enqueue(
        self,
        cuda: CudaContext,
        slot: Slot,
        lane: Lane,
        method: str,
        src: Layout,
        s_ids: Any,
        dst: Layout,
        d_ids: Any,
        job: _Job,
    ) -> None:
        """Queue one device copy (``method``) between two layouts on the slot; the lane's event marks its end."""
        if method in ("memcpy", "table"):
            from ._table import table_of, whole_block_runs

            runs = whole_block_runs(src, s_ids, dst, d_ids) if method == "memcpy" else None
            if runs is not None:  # whole blocks: their runs from the ids, no table to build
                cuda.enqueue_memcpy(slot, lane, *runs)
                return
            table = table_of(src, s_ids, dst, d_ids)
            if method == "memcpy":
                cuda.enqueue_memcpy(slot, lane, table.dst, table.src, table.size)
            else:
                deltas = (self._gpu_side(cuda, src, "source")[0], self._gpu_side(cuda, dst, "target")[0])
                cuda.enqueue_table(slot, lane, table, deltas)
            return
        src_side, dst_side = self._gpu_side(cuda, src, "source")[1], self._gpu_side(cuda, dst, "target")[1]
        if method == "bounce":
            if dst.storages[0].kind is StorageKind.PINNED:
                cuda.enqueue_bounce(slot, src_side, s_ids, dst_side, d_ids, src.spec, offload=True)
            else:
                cuda.enqueue_bounce(slot, dst_side, d_ids, src_side, s_ids, src.spec, offload=False)
        else:
            cuda.enqueue_blocks(slot, lane, src_side, s_ids, dst_side, d_ids, src.spec)

    def _finish_device(self, batch: _Batch, slot: Slot, step: str) -> None:
        """Wait for a device batch's event and finish it (on the completion thread, or the thread in copy())."""
        from ._hostio import StepError

        cuda = self._cuda
        assert cuda is not None
        error: StepError | None = None
        try:
            cuda.wait(slot.lanes[0], step)
        except StepError as exc:
            error = exc
        except BaseException as exc:
            error = _as_step_error(exc)
        self._done(batch, error)

    def _completion_queue(self) -> queue.SimpleQueue[tuple[_Batch, Slot, str] | None]:
        with self._lock:
            if self._completion_thread is None:
                self._completion_thread = threading.Thread(
                    target=self._complete_device_batches, name="kvbm-transfer-done", daemon=True
                )
                self._completion_thread.start()
        return self._completions

    def _complete_device_batches(self) -> None:
        while True:
            item = self._completions.get()
            if item is None:
                return
            self._finish_device(*item)

    # --- batches on worker threads -------------------------------------------------------------------------

    def _run_batch(self, batch: _Batch) -> None:
        error: StepError | None = None
        try:
            if batch.job.route == "staged":
                self._run_staged(batch)
            else:
                self._cpu_copy(batch.job, batch.job.src, batch.s_ids, batch.job.dst, batch.d_ids)
        except BaseException as exc:
            error = _as_step_error(exc)
        self._done(batch, error)

    def _cpu_copy(self, job: _Job, src: Layout, s_ids: Any, dst: Layout, d_ids: Any) -> None:
        """Host <-> host or host <-> disk, synchronously, spread over the I/O threads."""
        from ._hostio import HostMemory, host_copy_ops, io_ops, run_ops
        from ._table import table_of

        table = table_of(src, s_ids, dst, d_ids)
        src_kind, dst_kind = src.storages[0].kind, dst.storages[0].kind
        ops: list[IoOp]
        if StorageKind.DISK not in (src_kind, dst_kind):
            ops = host_copy_ops(table)
        elif dst_kind is StorageKind.DISK:
            ops = io_ops(table, HostMemory(src), dst, self._fds(job, dst), to_disk=True)
        else:
            ops = io_ops(table, HostMemory(dst), src, self._fds(job, src), to_disk=False)
        run_ops(ops, self._io_pool() if len(ops) > 1 else None, self._stop_reason)

    def _fds(self, job: _Job, layout: Layout) -> list[int]:
        return job.fds["src" if layout is job.src else "dst"]

    def _io_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._io is None:
                self._io = ThreadPoolExecutor(self.io_threads, thread_name_prefix="kvbm-transfer-io")
            return self._io

    # --- staged batches ------------------------------------------------------------------------------------

    def _run_staged(self, batch: _Batch) -> None:
        """Through the slot's two staging buffers, chunk by chunk, the GPU and the CPU working side by side."""
        import numpy as np

        from ..layout import Layout as _Layout

        job = batch.job
        spec = _staging_spec(job.src.spec, self.staging_bytes)
        chunk = spec.num_blocks
        n = int(batch.s_ids.size)
        chunks = [(batch.s_ids[i : i + chunk], batch.d_ids[i : i + chunk]) for i in range(0, n, chunk)]
        src_gpu = job.src_kind is StorageKind.DEVICE
        dst_gpu = job.dst_kind is StorageKind.DEVICE
        cuda = self._cuda if (src_gpu or dst_gpu) else None
        if cuda is None:
            stages = [_Layout(spec, [self._host_buffer(batch.slot, spec.allocation_bytes)])]
            for s_ids, d_ids in chunks:
                ids = np.arange(s_ids.size, dtype=np.int64)
                self._check_stop()
                self._cpu_copy(job, job.src, s_ids, stages[0], ids)
                self._check_stop()
                self._cpu_copy(job, stages[0], ids, job.dst, d_ids)
            return
        slot = cuda.slots[batch.slot]
        lanes = slot.lanes
        stages = [_Layout(spec, [cuda.staging(lane, spec.allocation_bytes)]) for lane in lanes]
        try:
            if src_gpu:  # GPU fills a staging buffer while the CPU drains the other
                self._gpu_leg(cuda, slot, lanes[0], job.src, chunks[0][0], stages[0], job)
                for k, (_, d_ids) in enumerate(chunks):
                    if k + 1 < len(chunks):
                        nxt = (k + 1) % 2
                        self._gpu_leg(cuda, slot, lanes[nxt], job.src, chunks[k + 1][0], stages[nxt], job)
                    cuda.wait(lanes[k % 2], "copy to staging")
                    self._check_stop()
                    ids = np.arange(d_ids.size, dtype=np.int64)
                    self._cpu_copy(job, stages[k % 2], ids, job.dst, d_ids)
            else:  # the CPU fills a staging buffer while the GPU drains the other
                for k, (s_ids, d_ids) in enumerate(chunks):
                    lane = lanes[k % 2]
                    if k >= 2:
                        cuda.wait(lane, "copy from staging")
                    self._check_stop()
                    ids = np.arange(s_ids.size, dtype=np.int64)
                    self._cpu_copy(job, job.src, s_ids, stages[k % 2], ids)
                    self._gpu_leg(cuda, slot, lane, stages[k % 2], ids, job.dst, job, d_ids)
                for lane in lanes[: len(chunks)]:
                    cuda.wait(lane, "copy from staging")
        finally:
            cuda.synchronize(slot)  # nothing of this batch is still moving once it reports

    def _gpu_leg(
        self,
        cuda: CudaContext,
        slot: Slot,
        lane: Lane,
        src: Layout,
        s_ids: Any,
        dst: Layout,
        job: _Job,
        d_ids: Any = None,
    ) -> None:
        """One staged chunk's GPU copy (``d_ids`` None: into the staging layout's blocks 0..k-1)."""
        import numpy as np

        if d_ids is None:
            d_ids = np.arange(s_ids.size, dtype=np.int64)
        (d_src, s_side), (d_dst, t_side) = self._gpu_side(cuda, src, "source"), self._gpu_side(cuda, dst, "target")
        method = self._device_method(src, dst, (d_src, d_dst), (s_side, t_side), bounce=False)  # lanes are taken
        self._enqueue(cuda, slot, lane, method, src, s_ids, dst, d_ids, job)

    def _host_buffer(self, slot: int, nbytes: int) -> Any:
        from ..storage import allocate_system

        buffer = self._host_staging.get(slot)
        if buffer is None or buffer.size < nbytes:
            if buffer is not None:
                buffer.close()
            buffer = self._host_staging[slot] = allocate_system(nbytes)
        return buffer

    def _check_stop(self) -> None:
        reason = self._stop_reason()
        if reason is not None:
            raise _step_error(reason, f"the transfer was {reason} before it finished")

    # --- close ---------------------------------------------------------------------------------------------

    def _release(self) -> None:
        try:
            with self._lock:
                while self._inflight > 0:
                    self._idle.wait()
            if self._completion_thread is not None:
                self._completions.put(None)
                self._completion_thread.join()
            for pool in (self._workers, self._io):
                if pool is not None:
                    pool.shutdown(wait=True)
            if self._cuda is not None:
                self._cuda.close()
            self._layout_sides.clear()
            self._layout_infos.clear()
            for buffer in self._host_staging.values():
                buffer.close()
            self._host_staging.clear()
        finally:
            self._close_done.set()


def _kind_of(layout: Layout, side: str) -> StorageKind:
    kinds = {s.kind for s in layout.storages}
    if len(kinds) != 1:
        raise TransferError(
            f"the {side} layout mixes storage kinds ({', '.join(sorted(k.value for k in kinds))}); "
            "a layout's storages must all be of one kind",
            src_tier=None,
            dst_tier=None,
            step="validate",
        )
    return kinds.pop()


def _route(src: StorageKind, dst: StorageKind) -> str:
    device = StorageKind.DEVICE
    if src is device and dst is device:
        return "device"
    if {src, dst} == {device, StorageKind.PINNED}:
        return "device"
    if device in (src, dst):
        return "staged"  # pageable memory or disk: through pinned staging buffers
    if src is StorageKind.DISK and dst is StorageKind.DISK:
        return "staged"  # through a host buffer
    if StorageKind.DISK in (src, dst):
        return "io"
    return "host"


def _staging_spec(spec: LayoutSpec, budget: int) -> LayoutSpec:
    """A FullyContiguous layout of the model's blocks, 4096-aligned (O_DIRECT), as many as fit in ``budget``."""
    one = attrs.evolve(spec, num_blocks=1, layout_type=FullyContiguous(), alignment=4096)
    return attrs.evolve(one, num_blocks=max(1, budget // one.block_stride))


def _what(job: _Job) -> str:
    n = int(job.src_blocks.size)
    return (
        f"moving {n} block{'s' if n != 1 else ''} from the {job.src_kind.tier.words} ({job.src_kind.value}) to the "
        f"{job.dst_kind.tier.words} ({job.dst_kind.value})"
    )


def _ids(ids: Any) -> str:
    values = [int(x) for x in ids[:8]]
    more = f", ... ({int(ids.size)} blocks)" if ids.size > 8 else ""
    return "[" + ", ".join(map(str, values)) + more + "]"


def _step_error(step: str, message: str) -> StepError:
    from ._hostio import StepError

    return StepError(step, message)


def _as_step_error(exc: BaseException) -> StepError:
    from ._hostio import StepError

    if isinstance(exc, StepError):
        return exc
    error = StepError("internal", f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _close_fds(job: _Job) -> None:
    for fds in job.fds.values():
        while fds:
            fd = fds.pop()
            with contextlib.suppress(OSError):
                os.close(fd)
