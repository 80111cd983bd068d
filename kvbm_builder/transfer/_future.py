"""``TransferFuture``: a ``concurrent.futures.Future`` that ``await`` also accepts."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from concurrent.futures import Future
from typing import Any

from ._errors import TransferRecord

__all__ = ["TransferFuture"]


class TransferFuture(Future[TransferRecord]):
    """The outcome of one ``TransferEngine.submit()``.

    ``result()`` blocks until every byte is in place and returns the :class:`TransferRecord`, or raises the
    :class:`TransferError` of a failed transfer; ``await future`` does the same without blocking an event loop.
    A future is never cancelled by ``cancel()`` once its copies started (bytes may already be moving).
    """

    def __await__(self) -> Generator[Any, None, TransferRecord]:
        return asyncio.wrap_future(self).__await__()
