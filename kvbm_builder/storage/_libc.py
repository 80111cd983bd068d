"""The few system calls the storages need: mappings and files as owning objects, the rest through ctypes.

A resource is owned by an object from the moment it exists: :func:`map_anonymous` returns an ``mmap.mmap`` and
:func:`open_new_file` an ``io.FileIO``, both made in C, so no interrupt (Ctrl-C is raised as soon as a call
returns) can separate the mapping or descriptor from its owner; whatever drops the object releases it. An
``mmap.mmap`` also refuses to unmap while a buffer of it is exported: a numpy view keeps its memory.

The ctypes calls release the GIL: page population and memset in worker threads really run in parallel.
Failures raise ``OSError`` with the C ``errno``. Other modules call these as ``_libc.name(...)`` so that fault
and interrupt tests can wrap each step.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import io
import mmap
import os
import platform
from functools import lru_cache
from typing import NoReturn

PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
MAP_PRIVATE = mmap.MAP_PRIVATE
MAP_HUGETLB = 0x40000  # same value on x86_64 and aarch64
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; EINVAL before
MPOL_PREFERRED = 1
MPOL_BIND = 2

PAGE_SIZE = mmap.PAGESIZE
# mbind(2) has no glibc wrapper (it lives in libnuma), so it is called through syscall(2).
_MBIND_NR = {"x86_64": 237, "aarch64": 235}


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.madvise.restype = ctypes.c_int
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.memset.restype = ctypes.c_void_p
    lib.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    lib.fallocate.restype = ctypes.c_int
    lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.syscall.restype = ctypes.c_long
    return lib


def _raise_errno(call: str) -> NoReturn:
    err = ctypes.get_errno()
    raise OSError(err, f"{call}: {os.strerror(err)}")


def _fits(call: str, *values: int, bits: int = 63) -> None:
    """ctypes silently wraps an int that does not fit its C type: refuse one, as the kernel would (EOVERFLOW)."""
    for value in values:
        if not 0 <= value < 1 << bits:
            raise OSError(errno.EOVERFLOW, f"{call}: {value} is outside the C argument's range 0..2**{bits} - 1")


def map_anonymous(length: int, *, hugetlb: bool = False) -> mmap.mmap:
    """A private anonymous read/write mapping of ``length`` bytes (MAP_HUGETLB when ``hugetlb``), owned by the
    returned object: :func:`close_mapping` or collecting the object unmaps it, never while a view exports it."""
    _fits("mmap", length)
    return mmap.mmap(-1, length, flags=MAP_PRIVATE | (MAP_HUGETLB if hugetlb else 0), prot=PROT_READ | PROT_WRITE)


def address_of(mapping: mmap.mmap) -> int:
    """The start address of a mapping (page aligned). The buffer export it takes is released before returning."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def close_mapping(mapping: mmap.mmap) -> None:
    """munmap now (at most once: closing again does nothing). BufferError while a view still exports it."""
    mapping.close()


def open_new_file(path: str) -> io.FileIO:
    """Create ``path`` (O_CREAT | O_EXCL, mode 0600) for reading and writing, close-on-exec. The descriptor is
    owned by the returned object from the start (the opener is os.open itself: no Python frame in between)."""
    return io.FileIO(path, "x+", opener=functools.partial(os.open, mode=0o600))


def close_file(file: io.FileIO) -> None:
    """Close the descriptor, at most once (FileIO forgets it before calling close(2), which frees it even when it
    fails); closing again does nothing."""
    file.close()


def set_o_direct(fd: int) -> None:
    """Turn O_DIRECT on for an open file: EINVAL where the file system does not support it."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)


def madvise(addr: int, length: int, advice: int) -> None:
    _fits("madvise", addr, length, bits=64)
    if _lib().madvise(addr, length, advice) != 0:
        _raise_errno("madvise")


def memset(addr: int, value: int, length: int) -> None:
    _fits("memset", addr, length, bits=64)
    _lib().memset(addr, value, length)


def fallocate(fd: int, offset: int, length: int, mode: int = 0) -> None:
    """fallocate(2): reserve blocks without writing them (``os.posix_fallocate`` silently writes zeros
    when the file system cannot reserve, which is slow and hides the problem)."""
    _fits("fallocate", offset, length)
    if _lib().fallocate(fd, mode, offset, length) != 0:
        _raise_errno("fallocate")


def mbind_supported() -> bool:
    return platform.machine() in _MBIND_NR


def mbind(addr: int, length: int, node: int, mode: int) -> None:
    """Set the NUMA policy of ``[addr, addr + length)`` to ``mode`` (MPOL_BIND / MPOL_PREFERRED) on ``node``.

    Must run before the pages are touched: it decides where later page faults allocate.
    """
    nr = _MBIND_NR.get(platform.machine())
    if nr is None:
        raise OSError(0, f"mbind: no syscall number known for {platform.machine()}")
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    words = node // bits + 1
    mask = (ctypes.c_ulong * words)()
    mask[node // bits] = 1 << (node % bits)
    # the kernel reads maxnode - 1 bits; one more than the mask holds, as libnuma does
    maxnode = words * bits + 1
    result = _lib().syscall(
        ctypes.c_long(nr),
        ctypes.c_void_p(addr),
        ctypes.c_ulong(length),
        ctypes.c_int(mode),
        mask,
        ctypes.c_ulong(maxnode),
        ctypes.c_uint(0),
    )
    if result != 0:
        _raise_errno("mbind")
