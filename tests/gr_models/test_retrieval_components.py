"""Relative attention bias, ranking metrics, target ranks and the sampled-softmax loss against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gr_models.modules.relative_bias import RelativeBucketedTimeAndPositionBias, log_time_buckets
from gr_models.retrieval.evaluation import target_ranks
from gr_models.retrieval.losses import SampledSoftmaxLoss
from gr_models.retrieval.metrics import RankingMetrics


def test_log_time_buckets_hand_values() -> None:
    base = math.exp(0.301)
    deltas = torch.tensor([0, 1, -1, 2, 10, 3600, -86400, 10**12])
    expected = [math.floor(math.log(max(abs(int(d)), 1)) / math.log(base)) for d in deltas]
    assert log_time_buckets(deltas, 128).tolist() == [min(e, 128) for e in expected]
    assert log_time_buckets(torch.tensor([0, 1]), 5).tolist() == [0, 0]
    # clipped to num_buckets
    assert log_time_buckets(torch.tensor([10**12]), 10).tolist() == [10]
    with pytest.raises(ValueError, match="num_buckets"):
        log_time_buckets(deltas, 0)


def test_relative_bias_matches_loop() -> None:
    torch.manual_seed(0)
    rab_mod = RelativeBucketedTimeAndPositionBias(max_seq_len=6, num_time_buckets=16)
    lengths = [3, 1, 4]
    offsets = torch.tensor([0, 3, 4, 8])
    ts = torch.tensor([10, 50, 4000, 7, 1, 2, 100, 100000])
    qts = torch.tensor([50, 4000, 5000, 9, 2, 100, 100000, 100005])
    n = 5
    rab = rab_mod(ts, qts, offsets, n)
    assert rab.shape == (3, 1, n, n)
    for b, length in enumerate(lengths):
        s = int(offsets[b])
        for i in range(length):
            for j in range(length):
                bucket = log_time_buckets(torch.tensor([int(qts[s + i]) - int(ts[s + j])]), 16)[0]
                want = rab_mod.position_weights[j - i + 6 - 1] + rab_mod.time_weights[bucket]
                torch.testing.assert_close(rab[b, 0, i, j], want)
    with pytest.raises(ValueError, match="exceeds"):
        rab_mod(ts, qts, offsets, 7)


def test_ranking_metrics_hand_values() -> None:
    m = RankingMetrics(hr_ks=(1, 10), ndcg_ks=(10,))
    m.update(torch.tensor([0, 3]))
    m.update(torch.tensor([12]))
    out = m.compute()
    assert out["hr@1"] == pytest.approx(1 / 3)
    assert out["hr@10"] == pytest.approx(2 / 3)
    assert out["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(5)) / 3)
    assert out["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 13) / 3)
    with pytest.raises(ValueError, match="before any update"):
        RankingMetrics().compute()
    with pytest.raises(ValueError, match=">= 0"):
        RankingMetrics().update(torch.tensor([-1]))


def test_target_ranks_filters_history_but_not_target() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    targets = torch.tensor([3, 0])
    # user 0 history {0, 3}: item 0 is filtered, item 3 is the target (re-consumption) and stays
    hist_offsets = torch.tensor([0, 2, 3])
    hist_items = torch.tensor([0, 3, 4])
    ranks = target_ranks(scores, targets, hist_offsets, hist_items)
    assert ranks.tolist() == [2, 3]  # user 0: 0.8, 0.7 above; user 1: 0.2, 0.3, 0.4 above (0.5 filtered)
    assert target_ranks(scores, targets, None, None).tolist() == [3, 4]


@pytest.mark.parametrize("num_items", [20, 5000])  # both scoring paths: full catalogue matmul and [N, K, D] gather
def test_sampled_softmax_matches_manual(num_items: int) -> None:
    torch.manual_seed(0)
    d, n, k, temp = 8, 6, 4, 0.1
    table = F.normalize(torch.randn(num_items, d), dim=-1)
    q = F.normalize(torch.randn(n, d), dim=-1)
    targets = torch.randint(num_items, (n,))
    loss_fn = SampledSoftmaxLoss(num_items, num_negatives=k, temperature=temp)

    torch.manual_seed(123)
    negs = loss_fn.sample_negatives(targets)
    torch.manual_seed(123)
    loss = loss_fn(q, targets, lambda ids: table[ids])

    want = []
    for r in range(n):
        logits = [float(q[r] @ table[targets[r]]) / temp]
        logits += [float(q[r] @ table[j]) / temp for j in negs[r] if j != targets[r]]
        want.append(-logits[0] + math.log(sum(math.exp(x) for x in logits)))
    assert float(loss) == pytest.approx(sum(want) / n, rel=1e-5)


def test_sampled_softmax_masks_accidental_hits_and_rejects_bad_input() -> None:
    loss_fn = SampledSoftmaxLoss(1, num_negatives=3, temperature=1.0)  # every negative is the positive
    q = torch.ones(2, 2) / math.sqrt(2)
    loss = loss_fn(q, torch.zeros(2, dtype=torch.long), lambda ids: q[0].expand(*ids.shape, 2))
    assert float(loss) == pytest.approx(0.0, abs=1e-6)  # only the positive remains in the softmax
    with pytest.raises(ValueError, match="empty batch"):
        loss_fn(q[:0], torch.zeros(0, dtype=torch.long), lambda ids: q[0].expand(*ids.shape, 2))
    with pytest.raises(ValueError, match="negatives"):
        SampledSoftmaxLoss(10, negatives="popular")  # type: ignore[arg-type]


def test_in_batch_negatives_come_from_batch_targets() -> None:
    loss_fn = SampledSoftmaxLoss(1000, num_negatives=50, negatives="in_batch")
    targets = torch.tensor([7, 9, 11])
    assert set(loss_fn.sample_negatives(targets).unique().tolist()) <= {7, 9, 11}
