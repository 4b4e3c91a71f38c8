"""Config schema of the retrieval trainer; TOML files under ``examples/configs/`` mirror it section by section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from examples.common import sections as common
from gr_models.data.synthetic import SyntheticConfig
from gr_models.modules.hstu import HSTUConfig
from gr_models.modules.input_embedding import DynamicItemTableConfig
from gr_models.modules.sasrec import SASRecConfig


@dataclass
class DataConfig:
    dataset: Literal["synthetic", "ml-100k", "ml-1m", "ml-20m"] = "synthetic"
    data_dir: str | None = None  # local MovieLens folder; None: the download cache
    download: bool = True
    min_interactions: int = 3  # leave-one-out needs >= 3 (train, validation, test)
    synthetic: SyntheticConfig = field(
        default_factory=SyntheticConfig
    )  # [data.synthetic], used when dataset = "synthetic"

    def __post_init__(self) -> None:
        if self.min_interactions < 3:
            raise ValueError(f"min_interactions must be >= 3 for a leave-one-out split, got {self.min_interactions}")


@dataclass
class ModelConfig:
    encoder: Literal["hstu", "sasrec"] = "hstu"
    embedding_dim: int = 50
    max_seq_len: int = 200
    dropout: float = 0.2
    position_init_std: float | None = None  # None: the item embeddings' std
    hstu: HSTUConfig = field(default_factory=HSTUConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    # "dynamic": a gr-dynemb hash table for the items (pip install 'gr-models[dynemb]'), trained by its own fused
    # optimizer (lr/betas default to train.lr/train.betas) and configured in [model.dynamic_item_table].
    item_table: Literal["static", "dynamic"] = "static"
    dynamic_item_table: DynamicItemTableConfig = field(default_factory=DynamicItemTableConfig)

    def __post_init__(self) -> None:
        if self.item_table not in ("static", "dynamic"):
            raise ValueError(f"model.item_table must be 'static' or 'dynamic', got {self.item_table!r}")


@dataclass
class TrainConfig(common.TrainConfig):
    epochs: int = 100
    batch_size: int = 128
    eval_every: int = 5
    select_metric: str = "ndcg@10"
    num_negatives: int = 128
    temperature: float = 0.05
    negatives: Literal["uniform", "in_batch"] = "uniform"

    def _positive_keys(self) -> tuple[str, ...]:
        return (*super()._positive_keys(), "num_negatives")


@dataclass
class OutputConfig(common.OutputConfig):
    dir: str = "runs/retrieval"


@dataclass
class RetrievalExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    parallel: common.ParallelConfig = field(default_factory=common.ParallelConfig)  # torchrun layout (--tp)
