"""``gr_models.jagged`` helpers against plain per-sequence Python."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_models.jagged import query_timestamps


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 5), min_size=1, max_size=7), seed=st.integers(0, 2**16))
def test_query_timestamps_match_the_per_sequence_definition(lengths: list[int], seed: int) -> None:
    """Row i predicts at the next row's time, the last row of a sequence at its request time; empty sequences
    (which share their offset with a neighbour) change nothing."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ts = torch.randint(0, 10**9, (int(offsets[-1]),), generator=g)
    request = torch.randint(0, 10**9, (len(lengths),), generator=g)
    want = []
    for b, n in enumerate(lengths):
        rows = ts[int(offsets[b]) : int(offsets[b]) + n].tolist()
        want += rows[1:] + ([int(request[b])] if n else [])
    got = query_timestamps(ts, offsets, request)
    assert got.dtype == ts.dtype and got.tolist() == want
