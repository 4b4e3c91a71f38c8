"""Multi-task heads' configuration and weighted loss: binary tasks (BCE on logits) and regression tasks (MSE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gr_models.ranking.metrics import TaskSpec


@dataclass
class RankingTask:
    """A prediction task on every candidate: ``label`` names the label column (default: the task's name)."""

    name: str
    kind: Literal["binary", "regression"] = "binary"
    weight: float = 1.0
    label: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("binary", "regression"):
            raise ValueError(f"task {self.name!r}: kind must be 'binary' or 'regression', got {self.kind!r}")
        if self.weight < 0:
            raise ValueError(f"task {self.name!r}: weight must be >= 0, got {self.weight}")

    @property
    def label_name(self) -> str:
        return self.label or self.name

    def spec(self) -> TaskSpec:
        return TaskSpec(self.name, self.kind)


def check_tasks(tasks: list[RankingTask], label_names: set[str] | None = None) -> None:
    if not tasks:
        raise ValueError("at least one ranking task is needed")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    if label_names is not None:
        missing = sorted({t.label_name for t in tasks} - label_names)
        if missing:
            raise ValueError(f"task label(s) {missing} are not in the data; available: {sorted(label_names)}")


class MultiTaskLoss(nn.Module):
    """``sum_t weight_t * loss_t`` over the tasks' columns of ``predictions [T, num_tasks]``."""

    def __init__(self, tasks: list[RankingTask]) -> None:
        super().__init__()
        check_tasks(tasks)
        self.tasks = tasks

    def forward(
        self, predictions: torch.Tensor, labels: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the weighted total and each task's own (unweighted) loss."""
        if predictions.dim() != 2 or predictions.shape[1] != len(self.tasks):
            raise ValueError(f"predictions must be [T, {len(self.tasks)}], got {tuple(predictions.shape)}")
        parts: dict[str, torch.Tensor] = {}
        total = predictions.new_zeros(())
        for j, task in enumerate(self.tasks):
            y = labels[task.label_name].to(predictions.dtype)
            if task.kind == "binary":
                loss = F.binary_cross_entropy_with_logits(predictions[:, j], y)
            else:
                loss = F.mse_loss(predictions[:, j], y)
            parts[task.name] = loss
            total = total + task.weight * loss
        return total, parts


class TaskHeads(nn.Module):
    """One MLP (``hidden`` wide, ReLU) to all task outputs; regression outputs start at the label mean."""

    def __init__(self, in_dim: int, hidden: int, tasks: list[RankingTask], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, len(tasks))
        )

    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Starts each output at a given value (e.g. the training label mean of a regression task)."""
        with torch.no_grad():
            self.mlp[-1].bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
