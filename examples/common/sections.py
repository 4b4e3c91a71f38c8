"""Config sections both example trainers share; each trainer subclasses them to set its own defaults and keys."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """The ``[train]`` keys of the shared epoch loop (``examples.common.trainer.EpochTrainer``)."""

    epochs: int = 20
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eval_every: int = 1  # epochs between validations
    early_stop_patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    select_metric: str = "ndcg@10"  # validation metric (higher is better) that picks the best checkpoint
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 0  # torch intra-op threads; 0 = torch default
    checkpoint_every_steps: int = 0  # extra mid-epoch checkpoints; 0 = end of epoch only
    max_steps: int = 0  # stop (and checkpoint) after this many optimizer steps; 0 = no limit

    def _positive_keys(self) -> tuple[str, ...]:
        """Keys that must be >= 1 (a subclass adds its own)."""
        return ("epochs", "batch_size", "eval_batch_size", "eval_every")

    def __post_init__(self) -> None:
        for name in self._positive_keys():
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")


@dataclass
class OutputConfig:
    """The ``[output]`` section; a trainer subclass sets the default ``dir``."""

    dir: str = "runs/example"
    tensorboard: bool = True
    progress: bool = True  # tqdm bars
