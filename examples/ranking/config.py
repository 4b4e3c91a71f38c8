"""Config schema of the ranking trainer; TOML files ``examples/configs/ranking-*.toml`` mirror it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from examples.common import sections as common
from gr_models.data.synthetic import SyntheticConfig
from gr_models.modules.hstu import HSTUConfig
from gr_models.modules.input_embedding import DynamicItemTableConfig
from gr_models.ranking.tasks import RankingTask


def default_tasks() -> list[RankingTask]:
    return [RankingTask("like", "binary", 1.0), RankingTask("rating", "regression", 0.1)]


@dataclass
class DataConfig:
    dataset: Literal["synthetic", "ml-100k", "ml-1m", "kuairand-1k"] = "synthetic"
    data_dir: str | None = None  # local dataset folder; None: the download cache
    download: bool = True
    num_candidates: int = 10  # K: the last K events of a window are its candidates
    max_history: int = 100  # most recent history events kept per window
    min_history: int = 1  # windows with a shorter history are dropped
    train_stride: int = 0  # step between training windows; 0 = num_candidates
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.num_candidates < 1 or self.max_history < 0 or self.min_history < 0 or self.train_stride < 0:
            raise ValueError("data.num_candidates must be >= 1; max_history, min_history, train_stride >= 0")


@dataclass
class ModelConfig:
    type: Literal["hstu", "dlrm"] = "hstu"
    embedding_dim: int = 64
    dropout: float = 0.2
    max_seq_len: int = 0  # HSTU tokens per window; 0 = exactly what data.max_history needs
    action_mode: Literal["add", "interleave"] = "add"
    # "causal": user features as a causal prefix, so a KV-cached server can append events exactly
    # (gr_models.inference); "full": every token sees the features and the features see the whole history.
    context_attention: Literal["full", "causal"] = "full"
    head_hidden: int = 128
    dlrm_hidden: tuple[int, ...] = (256, 128)
    # "dynamic": the item ids go through a gr-dynemb hash table (pip install 'gr-models[dynemb]'), trained by its
    # own fused optimizer (lr/betas default to train.lr/train.betas), configured in [model.dynamic_item_table].
    item_table: Literal["static", "dynamic"] = "static"
    dynamic_item_table: DynamicItemTableConfig = field(default_factory=DynamicItemTableConfig)
    tasks: list[RankingTask] = field(default_factory=default_tasks)
    hstu: HSTUConfig = field(default_factory=HSTUConfig)


@dataclass
class TrainConfig(common.TrainConfig):
    epochs: int = 20
    batch_size: int = 64
    eval_every: int = 1
    select_metric: str = "like/auc"


@dataclass
class OutputConfig(common.OutputConfig):
    dir: str = "runs/ranking"


@dataclass
class RankingExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    parallel: common.ParallelConfig = field(default_factory=common.ParallelConfig)  # torchrun layout (--tp)
