"""The batched driver copy (``cuMemcpyBatchAsync``) as the engine calls it: what reaches the driver function, and
a refusal. The function here is a ctypes callback with the driver's signature, standing in for a driver this
machine does not have; on a GPU the real one moves bytes in ``tests/test_transfer_gpu.py``."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import pytest

from kvbm_builder.transfer._batch import _FUNCTION, _FUNCTION_12, BatchCopy, BatchCopyError, _Attributes


def recorder(calls: list[dict[str, Any]], result: int, *, fail_index: bool = False) -> Any:
    def read(address: int, count: int) -> list[int]:
        return list((ctypes.c_uint64 * count).from_address(address))

    def record(dsts: int, srcs: int, sizes: int, count: int, attrs: Any, idxs: int, num: int, *rest: Any) -> int:
        calls.append(
            {
                "dst": read(dsts, count),
                "src": read(srcs, count),
                "size": read(sizes, count),
                "attrs": [(a.src_access_order, a.flags) for a in attrs[:num]],
                "first": read(idxs, num),
                "stream": rest[-1],
                "fail_index": len(rest) == 2,
            }
        )
        return result

    return (_FUNCTION_12 if fail_index else _FUNCTION)(record)


@pytest.mark.parametrize("fail_index", [False, True], ids=["cuda-13", "cuda-12.8"])
def test_every_copy_goes_in_one_call_in_stream_order(fail_index: bool) -> None:
    calls: list[dict[str, Any]] = []
    function = recorder(calls, 0, fail_index=fail_index)
    copy = BatchCopy(function, str, fail_index=fail_index)
    dst = np.array([1 << 40, (1 << 40) + 4096], dtype=np.int64)  # what RegionTable holds
    src = np.array([7 << 32, 9 << 32], dtype=np.uint64)
    copy(dst, src, np.array([4096, 512], dtype=np.uint64), 0xABC)
    assert calls == [
        {
            "dst": [1 << 40, (1 << 40) + 4096],
            "src": [7 << 32, 9 << 32],
            "size": [4096, 512],
            "attrs": [(1, 0)],  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM: after what the stream did before
            "first": [0],
            "stream": 0xABC,
            "fail_index": fail_index,
        }
    ]


def test_nothing_to_copy_makes_no_call() -> None:
    calls: list[dict[str, Any]] = []
    BatchCopy(recorder(calls, 0), str, fail_index=False)(*(np.zeros(0, dtype=np.uint64),) * 3, 0)
    assert calls == []


def test_a_refusal_names_the_driver_error() -> None:
    calls: list[dict[str, Any]] = []
    copy = BatchCopy(recorder(calls, 1), lambda code: f"CUDA_ERROR_INVALID_VALUE ({code})", fail_index=False)
    one = np.ones(3, dtype=np.uint64)
    with pytest.raises(BatchCopyError, match=r"cuMemcpyBatchAsync of 3 copies failed: CUDA_ERROR_INVALID_VALUE \(1\)"):
        copy(one, one, one, 0)


def test_the_attributes_have_the_drivers_layout() -> None:
    # CUmemcpyAttributes: srcAccessOrder, srcLocHint {type, id}, dstLocHint {type, id}, flags
    assert ctypes.sizeof(_Attributes) == 24 and ctypes.alignment(_Attributes) == 4
