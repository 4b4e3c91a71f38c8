"""LruDict, the bounded memo of the serving path: lookups and stores mark recency, stores evict the least recently
used beyond the limit, and a bad limit is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_models.inference.lru import LruDict


def test_lookup_marks_recency_and_store_evicts_the_oldest() -> None:
    memo: LruDict[str, int] = LruDict(2)
    assert memo.store("a", 1) == 1
    memo.store("b", 2)
    assert memo.lookup("a") == 1  # "b" is now the least recently used
    memo.store("c", 3)
    assert list(memo) == ["a", "c"] and memo.lookup("b") is None


@settings(max_examples=50, deadline=None)
@given(limit=st.integers(1, 5), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=40))
def test_matches_a_recency_list(limit: int, ops: list[tuple[bool, int]]) -> None:
    memo: LruDict[int, int] = LruDict(limit)
    order: list[int] = []  # keys, least recently used first
    for is_store, key in ops:
        if is_store:
            memo.store(key, key * 10)
            order = [k for k in order if k != key] + [key]
            order = order[-limit:]
        else:
            assert memo.lookup(key) == (key * 10 if key in order else None)
            if key in order:
                order = [k for k in order if k != key] + [key]
        assert list(memo) == order


@pytest.mark.parametrize("limit", [0, -1, 2.0])
def test_bad_limit_is_refused(limit) -> None:
    with pytest.raises(ValueError, match="limit"):
        LruDict(limit)
