"""Kafka's murmur2 key partitioning, computed once per key and cached.

aiokafka's default partitioner is pure Python and runs on every keyed send (9-12 µs); a run key
is sent many times, so the partition is computed once per (key, partition count) and kept in a
bounded LRU. Same hash as the Java client (``Utils.murmur2`` then ``toPositive % n``), so a key
lands where Java producers would put it.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["PartitionCache", "murmur2", "partition_for"]

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2``: a signed 32-bit int, as Java returns it."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    n4 = length & ~3
    for i in range(0, n4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    rest = length & 3
    if rest == 3:
        h ^= data[n4 + 2] << 16
    if rest >= 2:
        h ^= data[n4 + 1] << 8
    if rest >= 1:
        h ^= data[n4]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key`` among ``partitions``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class PartitionCache:
    """Bounded LRU of ``(key, partition count) -> partition``."""

    __slots__ = ("_cache", "_max")

    def __init__(self, max_entries: int = 100_000) -> None:
        self._cache: OrderedDict[tuple[bytes, int], int] = OrderedDict()
        self._max = max_entries

    def get(self, key: bytes, partitions: int) -> int:
        """The partition of ``key``; computed on first use."""
        k = (key, partitions)
        p = self._cache.get(k)
        if p is not None:
            self._cache.move_to_end(k)
            return p
        p = partition_for(key, partitions)
        self._cache[k] = p
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return p

    def __len__(self) -> int:
        return len(self._cache)
