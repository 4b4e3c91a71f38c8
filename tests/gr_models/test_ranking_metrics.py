"""Ranking metrics against hand-computed values and torchmetrics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.classification import BinaryAUROC

from gr_models.ranking import RankingMetrics, TaskSpec, binary_auc, group_auc, normalized_entropy


def test_auc_hand_computed() -> None:
    # Pairs (pos, neg): (0.35, 0.1) right, (0.35, 0.4) wrong, (0.8, *) right -> 3 of 4.
    assert binary_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    # A tie between a positive and a negative counts one half: pairs (0.5 vs 0.5) = 0.5, (0.5 vs 0.2) = 1.
    assert binary_auc(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 0])) == 0.75


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=40))
def test_auc_matches_torchmetrics(rows: list[tuple[int, bool]]) -> None:
    scores = torch.tensor([s / 5 for s, _ in rows])
    labels = torch.tensor([int(y) for _, y in rows])
    if labels.sum() in (0, len(rows)):
        with pytest.raises(ValueError, match="positive and one negative"):
            binary_auc(scores, labels)
        return
    assert binary_auc(scores, labels) == pytest.approx(float(BinaryAUROC()(scores, labels)), abs=1e-6)


def test_normalized_entropy_hand_computed() -> None:
    p = torch.tensor([0.9, 0.2, 0.6, 0.3], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0])
    log_loss = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.3)) / 4
    base = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert normalized_entropy(p, y) == pytest.approx(log_loss / base, rel=1e-9)
    # Predicting the base rate everywhere gives NE = 1.
    assert normalized_entropy(torch.full((4,), 0.75), y) == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError, match="both classes"):
        normalized_entropy(p, torch.ones(4))


def test_gauc_averages_users_with_both_classes() -> None:
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.5, 0.2, 0.9, 0.3])
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1])
    users = torch.tensor([7, 7, 7, 7, 3, 3, 5, 5])  # user 5 has only positives: left out
    gauc, used = group_auc(scores, labels, users)
    assert used == 2 and gauc == pytest.approx((0.75 + 1.0) / 2)
    weighted, _ = group_auc(scores, labels, users, weighted=True)
    assert weighted == pytest.approx((4 * 0.75 + 2 * 1.0) / 6)
    nan, used = group_auc(scores[6:], labels[6:], users[6:])
    assert used == 0 and math.isnan(nan)


def test_ranking_metrics_report_every_task() -> None:
    m = RankingMetrics([TaskSpec("like", "binary"), TaskSpec("rating", "regression")])
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    preds = torch.tensor([[2.0, 3.0], [-1.0, 4.0], [0.5, 1.0], [-2.0, 5.0]])
    labels = {"like": torch.tensor([1.0, 0.0, 0.0, 0.0]), "rating": torch.tensor([4.0, 4.0, 2.0, 5.0])}
    m.update(preds[:2], {k: v[:2] for k, v in labels.items()}, torch.tensor([0, 0]))
    m.update(preds[2:], {k: v[2:] for k, v in labels.items()}, torch.tensor([1, 1]))
    out = m.compute()
    assert out["like/auc"] == 1.0 and out["like/gauc"] == 1.0  # user 1 has no positive: only user 0 counts
    assert out["like/accuracy"] == 0.75  # sigmoid(0.5) > 0.5 is the one miss
    assert out["rating/mse"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert out["like/ne"] == pytest.approx(normalized_entropy(torch.sigmoid(preds[:, 0]), labels["like"]))


def test_ranking_metrics_single_class_is_nan_not_a_crash() -> None:
    m = RankingMetrics([TaskSpec("like", "binary")])
    m.update(torch.tensor([[0.3], [-0.2]]), {"like": torch.zeros(2)}, torch.tensor([0, 1]))
    out = m.compute()
    assert math.isnan(out["like/auc"]) and math.isnan(out["like/ne"]) and math.isnan(out["like/gauc"])
    assert out["like/accuracy"] == 0.5
