"""Argument validation of hstu_attention: every bad argument raises an error that names it."""

from __future__ import annotations

import pytest
import torch

from gr_kernels import hstu_attention


def _args() -> dict[str, object]:
    # Two sequences of lengths 2 and 3, one head.
    return dict(q=torch.zeros(5, 1, 4), k=torch.zeros(5, 1, 4), v=torch.zeros(5, 1, 4),
                seq_offsets=torch.tensor([0, 2, 5]), max_seq_len=3, alpha=1.0)  # fmt: skip


BAD = {
    "offsets_short_end": (dict(seq_offsets=torch.tensor([0, 2, 4])), ValueError, "seq_offsets must start at 0 and end"),
    "offsets_not_zero": (dict(seq_offsets=torch.tensor([1, 2, 5])), ValueError, r"seq_offsets must start at 0.*got 1"),
    "offsets_decreasing": (dict(seq_offsets=torch.tensor([0, 4, 2, 5])), ValueError, r"non-decreasing.*\[2\] < "),
    "offsets_float": (dict(seq_offsets=torch.tensor([0.0, 5.0])), ValueError, "seq_offsets must be a 1-D int32/int64"),
    "offsets_2d": (dict(seq_offsets=torch.tensor([[0, 5]])), ValueError, "seq_offsets must be a 1-D"),
    "offsets_empty": (dict(seq_offsets=torch.zeros(0, dtype=torch.int64)), ValueError, "seq_offsets must be a 1-D"),
    "length_over_max": (dict(max_seq_len=2), ValueError, "sequence 1 has length 3 > max_seq_len=2"),
    "max_seq_len_zero": (dict(max_seq_len=0), ValueError, "max_seq_len must be an int >= 1"),
    "max_seq_len_float": (dict(max_seq_len=3.0), ValueError, "max_seq_len must be an int"),
    "targets_shape": (
        dict(num_targets=torch.tensor([1])),
        ValueError,
        r"num_targets must be an int32/int64 tensor \[B=2\]",
    ),
    "targets_float": (dict(num_targets=torch.tensor([0.0, 1.0])), ValueError, "num_targets must be an int32/int64"),
    "targets_too_many": (
        dict(num_targets=torch.tensor([0, 4])),
        ValueError,
        r"num_targets\[1\]=4 must lie in \[0, length",
    ),
    "targets_negative": (dict(num_targets=torch.tensor([-1, 0])), ValueError, r"num_targets\[0\]=-1"),
    "rab_batch": (dict(rab=torch.zeros(3, 1, 3, 3)), ValueError, r"rab must be \[B=2, 1 or heads=1, max_seq_len=3"),
    "rab_heads": (dict(rab=torch.zeros(2, 2, 3, 3)), ValueError, "rab must be"),
    "rab_size": (dict(rab=torch.zeros(2, 1, 4, 4)), ValueError, r"rab must be .* got \(2, 1, 4, 4\)"),
    "rab_dtype": (dict(rab=torch.zeros(2, 1, 3, 3, dtype=torch.int64)), TypeError, "rab must be float32"),
    "rab_device": (dict(rab=torch.zeros(2, 1, 3, 3, device="meta")), ValueError, "rab is on meta but q is on cpu"),
    "k_device": (dict(k=torch.zeros(5, 1, 4, device="meta")), ValueError, "k is on meta but q is on cpu"),
    "offsets_device": (dict(seq_offsets=torch.tensor([0, 2, 5], device="meta")), ValueError, "seq_offsets is on meta"),
    "k_shape": (dict(k=torch.zeros(5, 1, 3)), ValueError, "k must have q's shape"),
    "v_tokens": (dict(v=torch.zeros(4, 1, 4)), ValueError, r"v must be \[total_tokens=5, heads=1"),
    "q_dims": (dict(q=torch.zeros(5, 4)), ValueError, r"q must be \[total_tokens, heads, dim\]"),
    "v_dtype": (dict(v=torch.zeros(5, 1, 4, dtype=torch.float64)), TypeError, "q, k and v must share a dtype"),
    "q_int": (dict(q=torch.zeros(5, 1, 4, dtype=torch.int64)), TypeError, "q must be float32"),
    "q_not_tensor": (dict(q=[[0.0]]), TypeError, "q must be a torch.Tensor"),
    "max_attn_len": (dict(max_attn_len=-1), ValueError, "max_attn_len must be an int >= 0"),
    "context": (dict(contextual_seq_len=-2), ValueError, "contextual_seq_len must be an int >= 0"),
    "group": (dict(target_group_size=0), ValueError, "target_group_size must be an int >= 1"),
    "scaling": (dict(scaling_seqlen=0), ValueError, "scaling_seqlen must be None or an int >= 1"),
    "dropout_one": (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    "dropout_negative": (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
    "alpha_nan": (dict(alpha=float("nan")), ValueError, "alpha must be a finite float"),
    "alpha_inf": (dict(alpha=float("inf")), ValueError, "alpha must be a finite float"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_argument(case: str) -> None:
    change, error, match = BAD[case]
    args = {**_args(), **change}
    with pytest.raises(error, match=match):
        hstu_attention(**args)  # type: ignore[arg-type]


def test_value_checks_skipped_without_validate() -> None:
    # validate=False trusts the values (no host sync): out-of-range targets pass, structural errors still raise.
    args = {**_args(), "num_targets": torch.tensor([0, 5])}
    with pytest.raises(ValueError, match="num_targets"):
        hstu_attention(**args)  # type: ignore[arg-type]
    out = hstu_attention(**args, validate=False)  # type: ignore[arg-type]
    assert out.shape == (5, 1, 4)
    with pytest.raises(ValueError, match="rab must be"):
        hstu_attention(**{**_args(), "rab": torch.zeros(1)}, validate=False)  # type: ignore[arg-type]


def test_good_edge_cases_pass() -> None:
    # Empty batch (B = 0), all-empty sequences, int32 offsets/targets, sequences shorter than the context.
    no_targets = torch.zeros(0, dtype=torch.int64)
    empty = hstu_attention(torch.zeros(0, 2, 3), torch.zeros(0, 2, 3), torch.zeros(0, 2, 5), torch.tensor([0]), 4,
                           alpha=1.0, rab=torch.zeros(0, 2, 4, 4), num_targets=no_targets)  # fmt: skip
    assert empty.shape == (0, 2, 5)
    args = {**_args(), "seq_offsets": torch.tensor([0, 2, 5], dtype=torch.int32)}
    out = hstu_attention(**args, num_targets=torch.tensor([2, 1], dtype=torch.int32), contextual_seq_len=9)  # type: ignore[arg-type]
    assert out.shape == (5, 1, 4)
