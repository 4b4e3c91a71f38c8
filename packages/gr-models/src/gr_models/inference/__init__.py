"""KV-cached HSTU ranking inference (work in progress: the paged K/V cache; the scorer follows)."""

from gr_models.inference.kv_cache import CacheCapacityError, CacheEntry, CacheStats, KVCache

__all__ = ["CacheCapacityError", "CacheEntry", "CacheStats", "KVCache"]
