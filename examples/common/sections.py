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


@dataclass
class ParallelConfig:
    """The ``[parallel]`` section: how a run launched by torchrun (or with ``tp > 1``) is laid out and trained.

    A single process with ``tp = 1`` ignores everything but ``grad_clip`` and ``bf16``. Under torchrun the world is
    ``tp * dp`` ranks (gr-parallel's layout: consecutive ranks form a tensor-parallel group); ``train.batch_size``
    stays the GLOBAL batch, split over the ``dp`` data-parallel ranks, so a run trains the same batches at any size.
    """

    tp: int = 1  # tensor-parallel ranks per HSTU block (must divide model.hstu.num_heads and the world size)
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl
    load_balance: bool = True  # split each global batch over DP ranks by sum of L^2 (False: contiguous chunks)
    grad_clip: float = 0.0  # max global gradient norm (across TP and DP); 0 = no clipping
    bf16: bool = False  # bfloat16 mixed precision for the dense part
    timeout_s: float = 300.0  # collectives that wait longer fail (a crashed rank ends the run instead of a hang)
    # Static embedding tables: "model_parallel" shards them over the world (TorchRec planner; they train inside
    # backward with table_optimizer), "data_parallel" replicates them and trains them with the dense AdamW like a
    # single process does; "auto": model_parallel with CUDA, data_parallel on the CPU (FBGEMM's CPU kernel has no
    # Adam). Dynamic (gr-dynemb) tables are always sharded and keep their own optimizer.
    table_sharding: str = "auto"
    table_optimizer: str = "adam"  # model-parallel tables: adam | adagrad | rowwise_adagrad | sgd (lr = train.lr)
    # Retrieval with model-parallel tables: the next batch's host-to-device copy and sparse input all-to-all run
    # during this batch's step (gr_parallel.TrainPipeline; same results as the plain loop).
    pipeline: bool = True

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"parallel.tp must be >= 1, got {self.tp}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"parallel.backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.grad_clip < 0:
            raise ValueError(f"parallel.grad_clip must be >= 0, got {self.grad_clip}")
        if self.table_sharding not in ("auto", "model_parallel", "data_parallel"):
            raise ValueError(
                f"parallel.table_sharding must be auto, model_parallel or data_parallel, got {self.table_sharding!r}"
            )
        if self.table_optimizer not in ("adam", "adagrad", "rowwise_adagrad", "sgd"):
            raise ValueError(
                f"parallel.table_optimizer must be adam, adagrad, rowwise_adagrad or sgd, got {self.table_optimizer!r}"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s must be > 0, got {self.timeout_s}")
