"""The Hopper forward's tile order and its causal mask shortcut change no output bit.

Both are host-switchable (read per call): ``GR_KERNELS_FWD_SECTION`` forces how many (sequence, head) pairs share a
section of the forward's longest-first tile order (1 = the per-sequence order the kernel had before), and
``GR_KERNELS_FWD_CAUSAL_FAST=0`` sends the masked tiles of causal sequences (no context, no window; in delta-q calls
also with targets in groups of one) through the general mask. Every
CTA computes the same tile with the same arithmetic whatever the order, and the shortcut zeroes exactly the
elements the general mask zeroes (host self-check: ``_C.sm90_fwd_self_check``), so all variants must agree bit for
bit (split KV: its two mask variants), and agree with the fp32 reference within the parity bound of
tests/gr_kernels/test_cutlass_backend.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_kernels import hstu_attention
from tests.gr_kernels.native_cases import needs_sm90, rounding_floor


@contextlib.contextmanager
def _env(**switches: str) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in switches}
    os.environ.update(switches)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _case(lengths: list[int], heads: int, dim: int, seed: int, dtype: torch.dtype = torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, generator=gen) for _ in range(3))
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    return [t.to("cuda") for t in (q, k, v)], [t.to("cuda", dtype) for t in (q, k, v)], offsets.to("cuda")


UNSPLIT = {
    "default": {},
    "per_sequence_order": {"GR_KERNELS_FWD_SECTION": "1"},
    "section_3": {"GR_KERNELS_FWD_SECTION": "3"},
    "general_mask": {"GR_KERNELS_FWD_CAUSAL_FAST": "0"},
    "previous_kernel": {"GR_KERNELS_FWD_SECTION": "1", "GR_KERNELS_FWD_CAUSAL_FAST": "0"},
}
# Split KV keeps its own grid; only the mask shortcut applies there.
SPLIT = {"split_3": {}, "split_3_general_mask": {"GR_KERNELS_FWD_CAUSAL_FAST": "0"}}


def _variants(q, k, v, offsets, n, splits: str, variants: dict, **kw) -> dict[str, torch.Tensor]:
    outs = {}
    for name, switches in variants.items():
        with _env(GR_KERNELS_FWD_KERNEL="sm90", GR_KERNELS_FWD_SPLITS=splits, **switches):
            outs[name] = hstu_attention(q, k, v, offsets, n, backend="cutlass", **kw)
    return outs


def _assert_all_equal(outs: dict[str, torch.Tensor], base: torch.Tensor) -> None:
    for name, out in outs.items():
        assert torch.equal(out, base), f"{name}: max diff {(out.float() - base.float()).abs().max().item():.3e}"


def _check(
    lengths: list[int],
    heads: int,
    dim: int,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
    q_lens: list[int] | None = None,
    **kw,
) -> None:
    """Every variant equal bit for bit, and within the parity bound of the fp32 reference; ``q_lens``: delta q (the
    last ``q_lens[b]`` positions of sequence b are the queries)."""
    (q32, k32, v32), (q, k, v), offsets = _case(lengths, heads, dim, seed, dtype)
    n = max([*lengths, 1])
    if q_lens is not None:
        rows = torch.cat([torch.arange(e - m, e) for e, m in zip(offsets[1:].tolist(), q_lens, strict=True)])
        q32, q = q32[rows.cuda()], q[rows.cuda()]
        q_offsets = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int64)
        kw.update(q_offsets=q_offsets.cuda(), max_q_len=max([*q_lens, 1]))
    kw.setdefault("alpha", dim**-0.5)
    unsplit = _variants(q, k, v, offsets, n, "1", UNSPLIT, **kw)
    _assert_all_equal(unsplit, unsplit["previous_kernel"])
    split = _variants(q, k, v, offsets, n, "3", SPLIT, **kw)
    _assert_all_equal(split, split["split_3_general_mask"])
    if unsplit["default"].numel() == 0:
        return
    exact = hstu_attention(q32, k32, v32, offsets, n, backend="reference", **kw)
    low = hstu_attention(q, k, v, offsets, n, backend="reference", **kw)
    ref_err = (low.float() - exact).abs().max().item()
    for out in (unsplit["default"], split["split_3"]):
        err = (out.float() - exact).abs().max().item()
        assert err <= 2 * ref_err + rounding_floor(exact, dtype), f"kernel error {err:.3e}, reference {ref_err:.3e}"


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_jagged_causal_orders_and_masks_agree(dim: int) -> None:
    # Ragged lengths (0, 1, tile edges, a long one), several sections of pairs, partial last query tiles.
    _check([0, 1, 127, 128, 129, 700, 255, 1030, 64, 2], 3, dim, seed=dim)


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize(
    "kw",
    [
        {"num_targets": torch.tensor([0, 3, 0, 9])},
        {"num_targets": torch.tensor([0, 3, 1, 200]), "target_group_size": 3},
        {"contextual_seq_len": 5},
        {"max_attn_len": 40},
        {"causal": False},
    ],
    ids=["targets", "target_groups", "context", "window", "full"],
)
def test_masks_with_and_without_the_shortcut(kw: dict) -> None:
    # Full attention: only plain causal sequences take the shortcut (causal_fast.h), these must keep the general
    # mask. A wrong shortcut, or one taken where it does not hold, would drop visible keys or keep masked ones.
    kw = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in kw.items()}
    _check([300, 129, 1, 520], 2, 128, seed=1, **kw)


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_delta_q_candidates_take_the_shortcut(dim: int) -> None:
    # The scoring call of inference, whose targets in groups of one take the shortcut: a few new history rows plus
    # candidates (targets) against a long cached history, query tiles that straddle the history/target boundary and
    # key tiles that hold targets.
    lengths, q_lens = [1300, 700, 130, 5], [257, 129, 130, 5]
    targets = torch.tensor([256, 100, 128, 4], device="cuda")
    _check(lengths, 2, dim, seed=dim, q_lens=q_lens, num_targets=targets)


@needs_sm90
@pytest.mark.gpu
@settings(max_examples=20, deadline=None, database=None)
@given(data=st.data())
def test_hypothesis_orders_and_masks_agree(data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(0, 600), min_size=1, max_size=9))
    dim = data.draw(st.sampled_from([64, 128, 256]))
    heads = data.draw(st.integers(1, 4))
    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float16]))
    _check(lengths, heads, dim, data.draw(st.integers(0, 1000)), dtype)
