"""A small thread-safe LRU of loaded objects (models, classifiers, datasets) for one process."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    """At most ``size`` values, the least recently used dropped first (``size`` 0: keep none).

    Loading happens outside the lock, so a slow load does not block hits on other keys; two
    threads missing the same key may both load it, and the later one is kept.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, load: Callable[[], V]) -> V:
        """The value under ``key``, loaded (and kept) on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()
        if self.size > 0:
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return value

    def forget(self, drop: Callable[[K], bool]) -> None:
        """Drop every value whose key ``drop`` accepts."""
        with self._lock:
            for key in [k for k in self._items if drop(k)]:
                del self._items[key]

    def held_keys(self) -> list[K]:
        """The keys held now, least recently used first."""
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)
