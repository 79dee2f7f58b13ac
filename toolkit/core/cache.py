"""The one byte-bounded LRU map (engine embeddings, tune's decoded batches, backend images)."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """A thread-safe LRU map bounded by the bytes of its values, with an optional time to live."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int], ttl: float | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.ttl = ttl
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int, float]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._used = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if self.ttl is not None and time.monotonic() - item[2] > self.ttl:
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        size = self._size_of(value)
        with self._lock:
            if key in self._items:
                self._drop(key)
            if size > self.max_bytes:
                return  # larger than the whole cache: not kept
            self._items[key] = (value, size, time.monotonic())
            self._used += size
            while self._used > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _drop(self, key: Hashable) -> None:
        _, size, _ = self._items.pop(key)
        self._used -= size
