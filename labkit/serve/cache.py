"""A small thread-safe LRU with hit/miss counters, for tokenization and finished translations.

    cache = LRU(2)
    cache.put("a", 1); cache.put("b", 2); cache.get("a"); cache.put("c", 3)   # evicts "b"
    cache.get("b")          # -> None (a miss)
    cache.hits, cache.misses, cache.hit_rate   # -> 1, 1, 0.5

Size 0 disables it: every get is a miss and put stores nothing, so callers need no branch.
Left out: time-based expiry and size in bytes (entries are short sentences; a count bounds them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class LRU:
    """Least-recently-used map of at most `size` entries; safe to share between threads."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"cache size must be >= 0, got {size}")
        self.size = size
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()  # the tokenizer cache is read from a thread pool
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def hit_rate(self) -> float:
        """Hits / lookups so far (0.0 before the first lookup)."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0
