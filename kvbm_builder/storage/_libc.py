"""The few libc calls the storages need, through ctypes.

Every call goes through ``ctypes.CDLL``, which releases the GIL for its duration: page population and
memset in worker threads really run in parallel. Failures raise ``OSError`` with the C ``errno``.
Other modules call these as ``_libc.name(...)`` so that fault tests can replace one step.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
from functools import lru_cache
from typing import NoReturn

PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
MAP_PRIVATE = mmap.MAP_PRIVATE
MAP_ANONYMOUS = mmap.MAP_ANONYMOUS
MAP_HUGETLB = 0x40000  # same value on x86_64 and aarch64
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; EINVAL before
MPOL_PREFERRED = 1
MPOL_BIND = 2

PAGE_SIZE = mmap.PAGESIZE
# mbind(2) has no glibc wrapper (it lives in libnuma), so it is called through syscall(2).
_MBIND_NR = {"x86_64": 237, "aarch64": 235}
_MAP_FAILED = ctypes.c_void_p(-1).value


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    lib.munmap.restype = ctypes.c_int
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.madvise.restype = ctypes.c_int
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.memset.restype = ctypes.c_void_p
    lib.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    lib.fallocate.restype = ctypes.c_int
    lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.mincore.restype = ctypes.c_int
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
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


def mmap_anonymous(length: int, *, hugetlb: bool = False) -> int:
    """A private anonymous read/write mapping of ``length`` bytes; its address (page aligned)."""
    _fits("mmap", length, bits=64)
    flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_HUGETLB if hugetlb else 0)
    addr = _lib().mmap(None, length, PROT_READ | PROT_WRITE, flags, -1, 0)
    if addr is None or addr == _MAP_FAILED:
        _raise_errno("mmap")
    return int(addr)


def munmap(addr: int, length: int) -> None:
    _fits("munmap", addr, length, bits=64)
    if _lib().munmap(addr, length) != 0:
        _raise_errno("munmap")


def is_mapped(addr: int) -> bool:
    """Whether the page holding ``addr`` is mapped in this process (mincore(2) says ENOMEM where it is not)."""
    page = addr - addr % PAGE_SIZE
    vec = ctypes.c_ubyte()
    if _lib().mincore(page, PAGE_SIZE, ctypes.byref(vec)) == 0:
        return True
    if ctypes.get_errno() == errno.ENOMEM:
        return False
    _raise_errno("mincore")


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
