"""Ranking metrics: AUC, normalized entropy (NE), GAUC, accuracy, MSE.

AUC, accuracy and MSE come from torchmetrics; NE and GAUC are small exact functions (torchmetrics has neither in
a per-user form), checked against hand-computed values in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from torchmetrics.regression import MeanSquaredError


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC (ties count one half): the Mann-Whitney U statistic over average ranks.

    Needs both classes; raises ValueError otherwise."""
    labels = labels.reshape(-1).to(torch.float64)
    scores = scores.reshape(-1).to(torch.float64)
    if scores.numel() != labels.numel():
        raise ValueError(f"scores ({scores.numel()}) and labels ({labels.numel()}) differ in size")
    n_pos = float(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative label")
    sorted_scores, order = torch.sort(scores)
    # Average rank (1-based) of every tie group.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    rank_sum = float((ranks * labels).sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def normalized_entropy(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean log loss divided by the entropy of the labels' base rate (He et al., 2014): 1.0 = no better than
    always predicting the average CTR. Needs both classes (the base-rate entropy is 0 otherwise)."""
    p = probs.reshape(-1).to(torch.float64).clamp(eps, 1 - eps)
    y = labels.reshape(-1).to(torch.float64)
    if p.numel() != y.numel() or p.numel() == 0:
        raise ValueError(f"probs ({p.numel()}) and labels ({y.numel()}) must be non-empty and of one size")
    log_loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    base = float(y.mean())
    if base in (0.0, 1.0):
        raise ValueError("NE needs both classes among the labels (base-rate entropy is 0)")
    base_entropy = -(
        base * torch.log(torch.tensor(base, dtype=torch.float64))
        + (1 - base) * torch.log(torch.tensor(1 - base, dtype=torch.float64))
    )
    return float(log_loss / base_entropy)


def group_auc(
    scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, *, weighted: bool = False
) -> tuple[float, int]:
    """GAUC: the AUC within every group (user) that holds both classes, averaged over those groups (by their
    number of examples when ``weighted``). Returns ``(gauc, number of groups used)``; NaN when no group counts."""
    groups = groups.reshape(-1)
    if not (scores.numel() == labels.numel() == groups.numel()):
        raise ValueError("scores, labels and groups must have one entry per example")
    total, weight_sum, used = 0.0, 0.0, 0
    order = torch.argsort(groups, stable=True)
    g_sorted = groups[order]
    _, counts = torch.unique_consecutive(g_sorted, return_counts=True)
    start = 0
    s_sorted, y_sorted = scores.reshape(-1)[order], labels.reshape(-1)[order]
    for c in counts.tolist():
        y = y_sorted[start : start + c]
        pos = float(y.sum())
        if 0 < pos < c:
            w = float(c) if weighted else 1.0
            total += w * binary_auc(s_sorted[start : start + c], y)
            weight_sum += w
            used += 1
        start += c
    return (total / weight_sum if used else float("nan")), used


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "binary" | "regression"


class RankingMetrics:
    """Accumulates candidate predictions over an evaluation and reports per task:
    binary -> ``auc``, ``ne``, ``gauc``, ``accuracy`` (threshold 0.5), ``logloss``; regression -> ``mse``.
    Keys are ``"<task>/<metric>"``. ``update`` takes logits (binary) or values (regression), ``[T, num_tasks]``."""

    def __init__(self, tasks: list[TaskSpec]) -> None:
        self.tasks = tasks
        self.reset()

    def reset(self) -> None:
        self._preds: list[torch.Tensor] = []
        self._labels: list[dict[str, torch.Tensor]] = []
        self._groups: list[torch.Tensor] = []

    def update(self, predictions: torch.Tensor, labels: dict[str, torch.Tensor], groups: torch.Tensor) -> None:
        self._preds.append(predictions.detach().float().cpu())
        self._labels.append({t.name: labels[t.name].detach().float().cpu() for t in self.tasks})
        self._groups.append(groups.detach().cpu())

    def compute(self) -> dict[str, float]:
        if not self._preds:
            raise ValueError("RankingMetrics.compute() before any update()")
        preds = torch.cat(self._preds)
        groups = torch.cat(self._groups)
        out: dict[str, float] = {}
        for j, task in enumerate(self.tasks):
            y = torch.cat([lab[task.name] for lab in self._labels])
            if task.kind == "binary":
                p = torch.sigmoid(preds[:, j])
                yi = y.round().to(torch.int64)
                both = 0 < int(yi.sum()) < yi.numel()  # AUC and NE are undefined on one class: NaN, not a crash
                out[f"{task.name}/auc"] = float(BinaryAUROC()(p, yi)) if both else float("nan")
                out[f"{task.name}/ne"] = normalized_entropy(p, y) if both else float("nan")
                out[f"{task.name}/gauc"] = group_auc(p, y, groups)[0]
                out[f"{task.name}/accuracy"] = float(BinaryAccuracy()(p, yi))
                out[f"{task.name}/logloss"] = float(
                    torch.nn.functional.binary_cross_entropy(p.double().clamp(1e-7, 1 - 1e-7), y.double())
                )
            else:
                out[f"{task.name}/mse"] = float(MeanSquaredError()(preds[:, j], y))
        return out
