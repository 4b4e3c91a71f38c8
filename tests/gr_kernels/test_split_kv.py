"""Split-KV native forward (``gr_kernels.split_kv``: small grids share each CTA's key tiles among several CTAs).

Everywhere: the split-count heuristic and the ``GR_KERNELS_FWD_SPLITS`` switch. The kernels' split tile ranges
(contiguous, covering the unsplit range exactly once, for every mask family and delta-q shift) are checked by the
host self-check that test_cutlass_backend.py runs. On an sm90 GPU: forced splits 1/2/3/7 through the Hopper and the
SM80-MMA kernels against an fp32 reference, with the kernels issue's rule (max-abs error at most 2x the PyTorch
reference's own error in the kernel's dtype, plus ``rounding_floor``), for every mask family, rab off/shared/per
head, ragged q and kv lengths including 0 and 1, delta q and full calls; the heuristic on the serving shape; bitwise
determinism; CUDA graph capture; no host sync.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from gr_kernels import hstu_attention, split_kv
from gr_kernels.split_kv import (
    FWD_SPLITS_ENV,
    MAX_FWD_SPLITS,
    MAX_HEURISTIC_SPLITS,
    MIN_TILES_PER_SPLIT,
    forced_fwd_splits,
    fwd_splits,
    heuristic_fwd_splits,
    key_block,
)
from tests.gr_kernels.conftest import make_jagged
from tests.gr_kernels.native_cases import MASK_FAMILIES, needs_sm90, rounding_floor

H200_SMS = 132


# ------------------------------------------------------------------------------------------------ heuristic (CPU)
def test_serving_shapes_split() -> None:
    # Issue 7's delta-q call: 256 query rows (2 tiles) x 4 heads against 4352 keys (34 tiles) is 8 CTAs unsplit;
    # one wave of 132 allows 16 shares, i.e. 3 tiles each, which need only 12 shares.
    assert heuristic_fwd_splits(1, 4, 256, 4352, 128, H200_SMS) == 12
    # One query tile: 4 CTAs, shares of the 2-tile minimum.
    assert heuristic_fwd_splits(1, 4, 1, 4096, 128, H200_SMS) == 16
    # Head dim 256 walks 64-key tiles: twice the tiles, capped at 32 shares.
    assert key_block(256) == 64 and key_block(128) == 128 and key_block(64) == 128
    assert heuristic_fwd_splits(1, 4, 1, 4096, 256, H200_SMS) == 32


def test_full_grids_stay_unsplit() -> None:
    assert heuristic_fwd_splits(32, 4, 4096, 4096, 128, H200_SMS) == 1  # the training shape: 1024 CTAs
    assert heuristic_fwd_splits(1, 4, 4352, 4352, 128, H200_SMS) == 1  # 35 tiles x 4 heads: more than half a wave
    assert heuristic_fwd_splits(1, 4, 256, 256, 128, H200_SMS) == 1  # 2 key tiles: one share would hold them all
    assert heuristic_fwd_splits(0, 4, 128, 4096, 128, H200_SMS) == 1  # empty batch
    assert heuristic_fwd_splits(1, 4, 0, 4096, 128, H200_SMS) == 1  # no query rows
    # A short single sequence: 16 query tiles x 4 heads = 64 CTAs, half a wave: 2 shares of 8 key tiles.
    assert heuristic_fwd_splits(1, 4, 2048, 2048, 128, H200_SMS) == 2


@settings(max_examples=300, deadline=None, database=None)
@given(
    batch=st.integers(0, 64),
    heads=st.integers(1, 8),
    grid_rows=st.integers(0, 9000),
    max_seq_len=st.integers(0, 20000),
    head_dim=st.sampled_from([64, 128, 256]),
    num_sms=st.sampled_from([1, 8, 78, 114, 132, 144]),
)
def test_heuristic_invariants(batch: int, heads: int, grid_rows: int, max_seq_len: int, head_dim: int,
                              num_sms: int) -> None:  # fmt: skip
    s = heuristic_fwd_splits(batch, heads, grid_rows, max_seq_len, head_dim, num_sms)
    ctas = -(-grid_rows // 128) * heads * batch
    key_tiles = -(-max_seq_len // key_block(head_dim))
    assert 1 <= s <= MAX_HEURISTIC_SPLITS
    if s == 1:
        return
    assert 2 * ctas <= num_sms, "a grid of more than half a wave is split"
    assert ctas * s <= num_sms, "the split grid is more than one wave"
    per_share = -(-key_tiles // s)
    assert per_share >= MIN_TILES_PER_SPLIT
    assert -(-key_tiles // per_share) == s, "some share is empty"


def test_switch_default_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FWD_SPLITS_ENV, raising=False)
    monkeypatch.setattr(split_kv, "SPLIT_KV_DEFAULT", False)
    assert forced_fwd_splits() is None
    assert fwd_splits(1, 4, 256, 4352, 128, torch.device("cpu")) == 1  # no device query when off
    monkeypatch.setenv(FWD_SPLITS_ENV, "")
    assert fwd_splits(1, 4, 256, 4352, 128, torch.device("cpu")) == 1


def test_switch_forces_counts_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(split_kv, "num_sms", lambda device: H200_SMS)
    for raw, want in (("1", 1), ("7", 7), (" 3 ", 3), (str(MAX_FWD_SPLITS), MAX_FWD_SPLITS)):
        monkeypatch.setenv(FWD_SPLITS_ENV, raw)
        assert fwd_splits(32, 4, 4096, 4096, 128, torch.device("cuda")) == want  # forced even on a full grid
    for raw in ("auto", "AUTO"):
        monkeypatch.setenv(FWD_SPLITS_ENV, raw)
        assert fwd_splits(1, 4, 256, 4352, 128, torch.device("cuda")) == 12
    monkeypatch.delenv(FWD_SPLITS_ENV)
    monkeypatch.setattr(split_kv, "SPLIT_KV_DEFAULT", True)  # what turning the default on does
    assert fwd_splits(1, 4, 256, 4352, 128, torch.device("cuda")) == 12
    assert fwd_splits(32, 4, 4096, 4096, 128, torch.device("cuda")) == 1


@pytest.mark.parametrize("raw", ["0", "-2", "x", "2.5", str(MAX_FWD_SPLITS + 1)])
def test_switch_rejects_bad_values(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(FWD_SPLITS_ENV, raw)
    with pytest.raises(ValueError, match=rf"{FWD_SPLITS_ENV} must be 'auto' or an integer in \[1, 256\], got"):
        fwd_splits(1, 4, 256, 4352, 128, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- GPU parity
@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Spy:
    """Stands in for gr_kernels._C and records the split count of every forward launch."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.splits: list[int] = []

    def hstu_fwd(self, *args: object) -> None:
        self.splits.append(int(args[-1]))  # type: ignore[call-overload]
        self.inner.hstu_fwd(*args)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    from gr_kernels import cutlass_backend

    recorder = _Spy(cutlass_backend._C)
    monkeypatch.setattr(cutlass_backend, "_C", recorder)
    return recorder


def _query_rows(seq_offsets: Tensor, q_lengths: list[int]) -> Tensor:
    ends = seq_offsets.tolist()[1:]
    return torch.cat([torch.zeros(0), *(torch.arange(e - n, e) for e, n in zip(ends, q_lengths, strict=True))]).long()


def check_split(lengths: list[int], q_lengths: list[int] | None, splits: int | str, *, kernel: str = "sm90",
                mask: str = "causal", rab_heads: int = 0, heads: int = 2, dim: int = 64,
                dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Tensor:  # fmt: skip
    """Native forward with ``GR_KERNELS_FWD_SPLITS=splits`` (full attention when ``q_lengths`` is None, else delta
    q) against the fp32 reference, by the 2x rule; returns the native output."""
    opts = dict(MASK_FAMILIES[mask])
    x = make_jagged(lengths, heads=heads, attn_dim=dim, hidden_dim=dim, rab_heads=rab_heads, seed=seed,
                    dtype=torch.float32, device="cuda", requires_grad=False)  # fmt: skip
    if "num_targets" in opts:
        opts["num_targets"] = torch.tensor([min(opts["num_targets"], max(n - 1, 0)) for n in lengths], device="cuda")
    kw = dict(seq_offsets=x.seq_offsets, max_seq_len=x.max_seq_len, alpha=1.0 / dim**0.5, **opts)
    q32 = x.q
    if q_lengths is not None:
        offsets = [0, *torch.tensor(q_lengths, dtype=torch.int64).cumsum(0).tolist()]
        kw.update(q_offsets=torch.tensor(offsets, device="cuda"), max_q_len=max([*q_lengths, 1]))
        q32 = x.q[_query_rows(x.seq_offsets.cpu(), q_lengths).cuda()]
    low = [t.to(dtype) for t in (q32, x.k, x.v)]
    low_rab = None if x.rab is None else x.rab.to(dtype)
    with _env(**{FWD_SPLITS_ENV: str(splits), "GR_KERNELS_FWD_KERNEL": kernel}):
        out = hstu_attention(*low, rab=low_rab, backend="cutlass", **kw)  # type: ignore[arg-type]
    ref_low = hstu_attention(*low, rab=low_rab, backend="reference", **kw)  # type: ignore[arg-type]
    exact = hstu_attention(q32, x.k, x.v, rab=x.rab, backend="reference", **kw)  # type: ignore[arg-type]
    assert out.dtype == dtype and out.shape == exact.shape
    if exact.numel():
        err = (out.float() - exact).abs().max().item()
        ref_err = (ref_low.float() - exact).abs().max().item()
        assert err <= 2 * ref_err + rounding_floor(exact, dtype), (
            f"{splits} splits ({kernel}): kernel error {err:.3e} > 2 x reference-{dtype} error {ref_err:.3e}"
        )
    return out


# Ragged kv lengths (0, 1, tile edges, several key tiles of either kernel) and query counts (0, 1, all, mid-tile,
# more than one query tile).
LENGTHS = [0, 1, 130, 77, 600, 64, 300]
Q_LENGTHS = [0, 1, 65, 77, 200, 1, 0]


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("delta", [False, True], ids=["full", "delta_q"])
@pytest.mark.parametrize("rab_heads", [0, 1, 2])
@pytest.mark.parametrize("mask", sorted(MASK_FAMILIES))
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_forced_splits_match_reference(splits: int, mask: str, rab_heads: int, delta: bool, kernel: str,
                                       spy: _Spy) -> None:  # fmt: skip
    check_split(LENGTHS, Q_LENGTHS if delta else None, splits, kernel=kernel, mask=mask, rab_heads=rab_heads)
    assert spy.splits == [splits]


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
def test_empty_calls_with_forced_splits(kernel: str, spy: _Spy) -> None:
    # No query rows at all: nothing to split (an empty workspace has no address), the call runs unsplit.
    for lengths, q_lengths in (([0, 0], [0, 0]), ([0], None), ([5, 3], [0, 0])):
        out = check_split(lengths, q_lengths, 4, kernel=kernel, rab_heads=1)
        assert out.numel() == 0
    assert spy.splits == [1, 1, 1]


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("splits", [2, 7])
def test_long_histories_dtypes_and_head_dims(splits: int, dim: int, dtype: torch.dtype, kernel: str) -> None:
    # Many key tiles per share (the K/V pipelines wrap around), odd max_seq_len (16-bit bias loads), masks mid-tile.
    check_split([1, 2049, 517, 1000], [1, 256, 129, 1], splits, kernel=kernel, mask="context_targets_window",
                rab_heads=1, dim=dim, dtype=dtype)  # fmt: skip


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("q_len", [1, 256])
def test_heuristic_on_the_serving_shape(q_len: int, spy: _Spy) -> None:
    # Issue 7: one user, 4 heads, head dim 128, a 4096-token history plus the new rows.
    kv = 4096 + q_len
    check_split([kv], [q_len], "auto", heads=4, dim=128, rab_heads=1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert split_kv.num_sms(torch.device("cuda")) == sms
    assert spy.splits == [heuristic_fwd_splits(1, 4, q_len, kv, 128, sms)]
    assert spy.splits[0] > 1


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
def test_splits_are_deterministic(kernel: str) -> None:
    first = check_split([2049, 3], [130, 3], 7, kernel=kernel, mask="targets", rab_heads=2, seed=4)
    again = check_split([2049, 3], [130, 3], 7, kernel=kernel, mask="targets", rab_heads=2, seed=4)
    assert torch.equal(first, again)


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
def test_split_forward_graph_capture_without_sync(kernel: str) -> None:
    # The workspace comes from torch's allocator (the graph's pool under capture) and the split count from the host:
    # capture works, replay equals the eager call bit for bit, and no call syncs.
    x = make_jagged([1000, 1, 517], heads=2, attn_dim=64, hidden_dim=64, rab_heads=1, seed=9, dtype=torch.bfloat16,
                    device="cuda", requires_grad=False)  # fmt: skip
    q_lengths = [3, 1, 129]
    q = x.q[_query_rows(x.seq_offsets.cpu(), q_lengths).cuda()]
    q_offsets = torch.tensor([0, 3, 4, 133], device="cuda")
    kw = dict(alpha=0.125, rab=x.rab, q_offsets=q_offsets, max_q_len=129, validate=False)
    with _env(**{FWD_SPLITS_ENV: "3", "GR_KERNELS_FWD_KERNEL": kernel}):
        eager = hstu_attention(q, x.k, x.v, x.seq_offsets, x.max_seq_len, backend="cutlass", **kw)  # type: ignore[arg-type]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = hstu_attention(q, x.k, x.v, x.seq_offsets, x.max_seq_len, backend="cutlass", **kw)  # type: ignore[arg-type]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = hstu_attention(q, x.k, x.v, x.seq_offsets, x.max_seq_len, backend="cutlass", **kw)  # type: ignore[arg-type]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(again, eager)
    assert torch.equal(captured, eager)
    ref = hstu_attention(q, x.k, x.v, x.seq_offsets, x.max_seq_len, backend="reference", **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(eager, ref, atol=2e-2, rtol=2e-2)


@needs_sm90
@pytest.mark.gpu
@settings(max_examples=40, deadline=None, database=None)
@given(data=st.data())
def test_split_hypothesis(data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(0, 700), min_size=1, max_size=4), label="lengths")
    delta = data.draw(st.booleans(), label="delta")
    q_lengths = [data.draw(st.integers(0, n), label="q_len") for n in lengths] if delta else None
    check_split(
        lengths,
        q_lengths,
        data.draw(st.integers(1, 9), label="splits"),
        kernel=data.draw(st.sampled_from(["sm90", "sm80"]), label="kernel"),
        mask=data.draw(st.sampled_from(sorted(MASK_FAMILIES)), label="mask"),
        rab_heads=data.draw(st.sampled_from([0, 1, 2]), label="rab_heads"),
        dim=data.draw(st.sampled_from([64, 128]), label="dim"),
        dtype=data.draw(st.sampled_from([torch.bfloat16, torch.float16]), label="dtype"),
        seed=data.draw(st.integers(0, 1000), label="seed"),
    )
