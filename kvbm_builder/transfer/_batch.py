"""``cuMemcpyBatchAsync``: many copies queued on the copy engine by one driver call (CUDA 12.8+, driver 570+).

Method ``memcpy`` (runs of 1 MiB and more) and the DMA rounds of ``bounce`` hand their whole run table to the copy
engine in one call instead of one ``cudaMemcpyAsync`` per run from Python. The driver function is looked up through
``cuGetProcAddress`` for the signature of the driver's version (CUDA 13.0 dropped ``failIdx``); the arrays go to it
as numpy buffers through ctypes, with no per-run Python object. The caller makes its device's context current.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

__all__ = ["BatchCopy", "BatchCopyError", "batch_copy"]

_CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 0x1
_FIRST_VERSION, _NO_FAIL_INDEX = 12080, 13000  # CUDA 12.8 brought it; 13.0 dropped its failIdx argument


class _Attributes(ctypes.Structure):
    """``CUmemcpyAttributes``: access order, two ``CUmemLocation`` hints (type, id), flags."""

    _fields_ = (
        ("src_access_order", ctypes.c_int),
        ("src_location_type", ctypes.c_int),
        ("src_location_id", ctypes.c_int),
        ("dst_location_type", ctypes.c_int),
        ("dst_location_id", ctypes.c_int),
        ("flags", ctypes.c_uint),
    )


_P = ctypes.c_void_p
_ARGUMENTS = (_P, _P, _P, ctypes.c_size_t, ctypes.POINTER(_Attributes), _P, ctypes.c_size_t)
_FUNCTION = ctypes.CFUNCTYPE(ctypes.c_int, *_ARGUMENTS, _P)  # ..., hStream
_FUNCTION_12 = ctypes.CFUNCTYPE(ctypes.c_int, *_ARGUMENTS, _P, _P)  # ..., size_t *failIdx, hStream


class BatchCopyError(RuntimeError):
    """The driver refused a batch of copies (raised as the engine's StepError)."""


class BatchCopy:
    """The driver's batched copy, with one attribute set (stream order) for every copy."""

    def __init__(self, function: Any, describe: Any, *, fail_index: bool) -> None:
        self._function = function
        self._describe = describe
        self._fail_index = ctypes.c_size_t(0) if fail_index else None
        self._attributes = _Attributes(_CU_MEMCPY_SRC_ACCESS_ORDER_STREAM, 0, 0, 0, 0, 0)
        self._first = (ctypes.c_size_t * 1)(0)

    def __call__(self, dst: Any, src: Any, size: Any, stream: int) -> None:
        """Queue ``size[i]`` bytes from ``src[i]`` to ``dst[i]`` on ``stream``; int64/uint64 contiguous arrays of one
        length. Raises :class:`BatchCopyError` with the driver's name for a refusal."""
        count = int(size.shape[0])
        if count == 0:
            return
        arrays = (dst.ctypes.data, src.ctypes.data, size.ctypes.data, count)
        attributes = (ctypes.byref(self._attributes), ctypes.addressof(self._first), 1)
        if self._fail_index is None:
            result = self._function(*arrays, *attributes, stream)
        else:
            result = self._function(*arrays, *attributes, ctypes.addressof(self._fail_index), stream)
        if result != 0:
            raise BatchCopyError(f"cuMemcpyBatchAsync of {count} copies failed: {self._describe(result)}")


_lock = threading.Lock()
_found: list[BatchCopy | None] = []


def batch_copy() -> BatchCopy | None:
    """The driver's ``cuMemcpyBatchAsync``, or None when this driver lacks it (older than CUDA 12.8)."""
    with _lock:
        if not _found:
            _found.append(_look_up())
        return _found[0]


def _look_up() -> BatchCopy | None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        get = lib.cuGetProcAddress_v2
    except (OSError, AttributeError):
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value < _FIRST_VERSION:
        return None
    api = _NO_FAIL_INDEX if version.value >= _NO_FAIL_INDEX else _FIRST_VERSION
    get.restype = ctypes.c_int
    get.argtypes = (ctypes.c_char_p, ctypes.POINTER(_P), ctypes.c_int, ctypes.c_uint64, ctypes.POINTER(ctypes.c_int))
    pointer, status = _P(), ctypes.c_int()
    if get(b"cuMemcpyBatchAsync", ctypes.byref(pointer), api, 0, ctypes.byref(status)) or not pointer.value:
        return None
    name = lib.cuGetErrorName
    name.restype = ctypes.c_int
    name.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p))

    def describe(code: int) -> str:
        text = ctypes.c_char_p()
        if name(code, ctypes.byref(text)) == 0 and text.value:
            return f"{text.value.decode()} ({code})"
        return f"CUDA driver error {code}"

    if api == _NO_FAIL_INDEX:
        return BatchCopy(_FUNCTION(pointer.value), describe, fail_index=False)
    return BatchCopy(_FUNCTION_12(pointer.value), describe, fail_index=True)
