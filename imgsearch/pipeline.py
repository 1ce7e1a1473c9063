"""Decoding ahead of the encoder.

Reading and decoding images runs in worker threads (Pillow and hashlib
release the GIL) while the caller's thread runs the encoder, so neither waits
for the other.  Only ``ahead`` results exist at any moment, which bounds the
decoded pixels held in memory however many images there are.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


def prefetch(fn: Callable[[T], R], items: Iterable[T], *, ahead: int,
             workers: int | None = None) -> Iterator[R]:
    """``fn(item)`` for every item, in order, with up to ``ahead`` computed
    in advance.  Closing the generator early (an error or Ctrl-C in the
    consumer) cancels what has not started and waits only for what has."""
    ahead = max(1, ahead)
    source = iter(items)
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        pending = deque()
        try:
            for item in source:
                pending.append(pool.submit(fn, item))
                if len(pending) >= ahead:
                    break
            while pending:
                result = pending.popleft().result()
                for item in source:
                    pending.append(pool.submit(fn, item))
                    break
                yield result
        finally:
            for future in pending:
                future.cancel()
