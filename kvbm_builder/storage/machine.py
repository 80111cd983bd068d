"""What this machine has, for planning a cache before allocating it: host memory, the locked-memory limit, GPU
memory and free disk space. Each probe says why it cannot answer instead of raising; cupy is imported only by
:func:`gpu_memory`, and only once CUDA is known to be usable."""

from __future__ import annotations

import os
import shutil

from . import _cuda, _host

__all__ = ["disk_free", "gpu_memory", "host_memory", "locked_memory_limit"]


def host_memory() -> tuple[int | None, int | None]:
    """(total, available now) bytes of host RAM, from /proc/meminfo; None where it cannot be read."""
    return _host.meminfo("MemTotal"), _host.meminfo("MemAvailable")


def locked_memory_limit() -> tuple[int | None, str]:
    """The soft ``ulimit -l`` in bytes (None: unlimited) and in words, e.g. ``8.0 MiB (ulimit -l 8192)``."""
    return _host.memlock_bytes(), _host.memlock_limit()


def gpu_memory(device_id: int) -> tuple[int, int] | str:
    """(free, total) bytes of GPU ``device_id``, or why they cannot be known."""
    count, reason = _cuda._probe()
    if reason is not None:
        return f"no GPU visible: {reason}"
    if device_id >= count:
        return f"GPU {device_id} is not visible ({count} visible)"
    try:
        import cupy

        with cupy.cuda.Device(device_id):
            free, total = cupy.cuda.runtime.memGetInfo()
    except Exception as exc:  # the probe passed, so this is the device itself (busy, lost, out of memory)
        return f"cannot read the memory of GPU {device_id} ({type(exc).__name__}: {exc})"
    return int(free), int(total)


def disk_free(directory: str) -> int | str:
    """Free bytes in ``directory``, or why a cache file could not be made there."""
    if not os.path.exists(directory):
        return "the directory does not exist; create it or point DYN_KVBM_DISK_CACHE_DIR elsewhere"
    if not os.path.isdir(directory):
        return "is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return "the directory is not writable by this user"
    return shutil.disk_usage(directory).free
