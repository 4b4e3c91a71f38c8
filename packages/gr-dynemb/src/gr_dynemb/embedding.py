"""``DynamicEmbedding``: an embedding module over a ``DynamicHashTable`` with a fused backward optimizer.

Like TorchRec's fused embedding kernels, the table is not an ``nn.Parameter``: the optimizer runs inside backward.
Each backward de-duplicates the batch's ids, sums their gradients, and updates every touched row once:

- ``sgd``:             ``w -= lr * g``
- ``adagrad``:         ``s += g^2;  w -= lr * g / (sqrt(s) + eps)``                    (state: dim floats)
- ``rowwise_adagrad``: ``s += mean(g^2);  w -= lr * g / (sqrt(s) + eps)``              (state: 1 float)
- ``adam``:            torch's ``SparseAdam`` update with the module's step count t:    (state: 2 * dim floats)
  ``m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``

The optimizer state lives in the same row as the embedding (``[w | state]``), so eviction, export and checkpoints
move them together. Admission: with ``admit_after = k > 0`` an id gets a slot only once it has been seen in k
training batches; until then it reads ``default_value`` and its gradient is dropped (counted in ``unadmitted``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from gr_dynemb.caching import make_table
from gr_dynemb.grouped import groupable, grouped_train_lookup, sum_rows
from gr_dynemb.table import DynamicHashTable, DynamicTableConfig

OptimizerKind = Literal["sgd", "adagrad", "rowwise_adagrad", "adam"]

# state_dict entries of the admission counters (admit_after > 0): ids, their batch counts [m, 1], their scores.
ADMISSION_STATE = ("admission_keys", "admission_counts", "admission_scores")


@dataclass
class FusedOptimizerConfig:
    kind: OptimizerKind = "adam"
    lr: float = 1e-3
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "adagrad", "rowwise_adagrad", "adam"):
            raise ValueError(f"optimizer kind must be sgd, adagrad, rowwise_adagrad or adam, got {self.kind!r}")
        if self.lr <= 0 or self.eps <= 0:
            raise ValueError(f"lr and eps must be > 0, got lr={self.lr}, eps={self.eps}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")

    def state_dim(self, dim: int) -> int:
        return {"sgd": 0, "adagrad": dim, "rowwise_adagrad": 1, "adam": 2 * dim}[self.kind]


@dataclass
class DynamicEmbeddingConfig:
    table: DynamicTableConfig
    optimizer: FusedOptimizerConfig = field(default_factory=FusedOptimizerConfig)
    admit_after: int = 0  # batches an id must appear in before it gets a slot; 0 = admit at once
    default_value: float = 0.0  # embedding of ids not (yet) admitted, or missing at evaluation
    # What an id missing from the table reads in eval mode: "default" (default_value) or "initializer" (the row a
    # first training lookup would insert, e.g. for full-catalogue scoring); eval never inserts either way.
    eval_missing: Literal["default", "initializer"] = "default"

    def __post_init__(self) -> None:
        if self.admit_after < 0:
            raise ValueError(f"admit_after must be >= 0, got {self.admit_after}")
        if self.eval_missing not in ("default", "initializer"):
            raise ValueError(f"eval_missing must be 'default' or 'initializer', got {self.eval_missing!r}")


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: Tensor, module: DynamicEmbedding, unique: Tensor, inverse: Tensor, rows: Tensor):  # type: ignore[override]
        ctx.module, ctx.unique, ctx.inverse = module, unique, inverse
        return rows[inverse]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        module: DynamicEmbedding = ctx.module
        unique: Tensor = ctx.unique
        summed = sum_rows(grad.detach().to(unique.device, torch.float32), ctx.inverse, unique.numel())
        module.apply_gradients(unique, summed, distinct=True)
        return None, None, None, None, None


class DynamicEmbedding(nn.Module):
    """Embeddings of arbitrary int64 ids (any shape) -> ``[*ids.shape, dim]``; see the module docstring."""

    def __init__(self, config: DynamicEmbeddingConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.table.dim
        # One table on the config's device, or caching storage (config.table.cache_capacity: gr_dynemb.caching).
        self.table = make_table(config.table, state_dim=config.optimizer.state_dim(self.dim))
        self.counter: DynamicHashTable | None = None
        if config.admit_after > 0:
            # Sightings per id: a constant-0 row of width 1 whose value counts the batches the id appeared in.
            counter_cfg = DynamicTableConfig(
                dim=1,
                capacity=config.table.capacity,
                max_capacity=config.table.max_capacity,
                policy="lru",
                num_threads=config.table.num_threads,
                device=config.table.device,  # sightings are counted where the table lives (all in HBM on a GPU)
            )
            counter_cfg.initializer.kind = "constant"
            counter_cfg.initializer.value = 0.0
            self.counter = DynamicHashTable(counter_cfg)
        self.step = 0  # optimizer steps taken (Adam's t); also the table's LRU clock
        # Gradients dropped because their id had no slot, kept on the table's device (read on demand: no sync).
        # A plain attribute, not a buffer: it stays with the table when the module moves.
        self._unadmitted = torch.zeros((), dtype=torch.int64, device=self.table.device)
        # The table stays on its own device (host memory or its GPU); this buffer follows .to() and tells forward
        # where the model wants the output.
        self.register_buffer("_anchor", torch.zeros(0, device=self.table.device), persistent=False)
        # autograd calls a Function's backward only if some input requires grad: this scalar is that input (it is
        # not a Parameter, so no outside optimizer sees it; its gradient is always None).
        self._grad_anchor = torch.zeros(1, requires_grad=True)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dtype != torch.int64:
            raise TypeError(f"ids must be int64, got {ids.dtype}")
        if groupable(self):  # training without admission: the grouped path (a group of one; see gr_dynemb.grouped)
            return grouped_train_lookup([self], [ids])[0]
        return self._lookup_one(ids)

    def _lookup_one(self, ids: Tensor) -> Tensor:
        """This table's lookup on its own (evaluation, admission, and a grouped batch holding a reserved id)."""
        flat = ids.reshape(-1).to(self.table.device)  # the table's device (CPU table: host; CUDA table: its GPU)
        unique, inverse = torch.unique(flat, return_inverse=True)
        if self.training:
            self.table.set_step(self.step + 1)
            rows = self._train_rows(unique)
        else:
            found_rows, found = self.table.find(unique)
            rows = torch.where(found.unsqueeze(1), found_rows[:, : self.dim], self.config.default_value)
            if self.config.eval_missing == "initializer" and not bool(found.all()):
                rows[~found] = self.table.initial_rows(unique[~found])[:, : self.dim]
        if self.training and torch.is_grad_enabled():
            out = _Lookup.apply(self._grad_anchor, self, unique, inverse, rows)
        else:
            out = rows[inverse]
        return out.reshape(*ids.shape, self.dim).to(self._anchor.device)

    @property
    def unadmitted(self) -> int:
        """Gradients dropped so far because their id had no slot (not yet admitted, or rejected by a full bucket)."""
        return int(self._unadmitted)

    def _train_rows(self, unique: Tensor) -> Tensor:
        dev = self.table.device
        if self.counter is None:  # every id is admitted (rejected ids read the initializer's row, with no slot)
            return self.table.find_or_insert(unique)[0][:, : self.dim]
        _, present = self.table.find(unique)
        newcomers = unique[~present]
        counts, _ = self.counter.find_or_insert(newcomers)
        self.counter.accumulate(newcomers, torch.ones(newcomers.numel(), 1, device=dev))
        admit_now = counts[:, 0] + 1 >= self.config.admit_after
        self.counter.erase(newcomers[admit_now])
        admitted = torch.ones(unique.numel(), dtype=torch.bool, device=dev)
        admitted[~present] = admit_now
        rows = torch.full((unique.numel(), self.dim), self.config.default_value, device=dev)
        if bool(admitted.any()):
            values, _ = self.table.find_or_insert(unique[admitted])
            rows[admitted] = values[:, : self.dim]
        return rows

    @torch.no_grad()
    def apply_gradients(self, unique: Tensor, grad: Tensor, *, distinct: bool = False) -> None:
        """One fused optimizer step on the rows of ``unique`` (de-duplicated ids) with summed gradients;
        ``distinct=True`` skips the table's bucket locks (see ``DynamicHashTable.apply_optimizer``)."""
        self.step += 1
        opt = self.config.optimizer
        # One native pass: find each row, update it and its state in place (no gather/scatter, no host sync).
        found = self.table.apply_optimizer(
            unique, grad, opt.kind, lr=opt.lr, eps=opt.eps, beta1=opt.beta1, beta2=opt.beta2, step=self.step,
            distinct=distinct,
        )  # fmt: skip
        self._unadmitted += (~found).sum()

    # state_dict holds the table's rows (embedding + optimizer state), scores and the step counter, and with
    # admission (admit_after > 0) the counters of the ids not admitted yet.
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        keys, values, scores = self.table.export_to_host()  # rows are saved from host memory whatever the device
        destination[prefix + "table_keys"] = keys
        destination[prefix + "table_values"] = values
        destination[prefix + "table_scores"] = scores
        destination[prefix + "step"] = torch.tensor(self.step)
        if self.counter is not None:
            keys, counts, scores = self.counter.export_to_host()
            destination[prefix + "admission_keys"] = keys
            destination[prefix + "admission_counts"] = counts
            destination[prefix + "admission_scores"] = scores

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):  # type: ignore[override]
        names = [prefix + n for n in ("table_keys", "table_values", "table_scores", "step")]
        if all(n in state_dict for n in names):
            keys, values, scores, step = (state_dict[n] for n in names)
            if values.dim() != 2 or values.shape[1] != self.table.value_dim:
                errors.append(
                    f"{prefix}table_values: rows of width {tuple(values.shape)[1:]} do not fit this table's "
                    f"{self.table.value_dim} (embedding dim + optimizer state)"
                )
            else:
                self.table.clear()
                if keys.numel():
                    self.table.restore(keys, values, scores)
                self.step = int(step)
                self.table.set_step(self.step)
                if self.counter is not None:
                    self._load_admission(state_dict, prefix, errors)
        elif strict:
            missing_keys.extend(n for n in names if n not in state_dict)
        if self.counter is not None:  # without admission, saved counters are left to be reported as unexpected
            names += [prefix + n for n in ADMISSION_STATE]
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if k not in names},
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            errors,
        )

    def _load_admission(self, state_dict, prefix: str, errors: list[str]) -> None:
        """The admission counters from a state dict; one saved before they were (or without admission) leaves them
        empty, with a warning: ids seen but not admitted yet are counted again."""
        assert self.counter is not None
        names = [prefix + n for n in ADMISSION_STATE]
        present = [n in state_dict for n in names]
        if any(present) and not all(present):
            errors.append(f"admission counters: {[n for n in names if n not in state_dict]} missing from the state")
            return
        self.counter.clear()
        if not any(present):
            from gr_dynemb.checkpoint import LegacyDumpWarning

            warnings.warn(
                f"the state of {prefix or 'this DynamicEmbedding'} holds no admission counters (saved before they "
                "were, or without admission): they start empty",
                LegacyDumpWarning,
                stacklevel=5,
            )
            return
        keys, counts, scores = (state_dict[n] for n in names)
        if keys.numel():
            self.counter.restore(keys, counts, scores)

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={self.dim}, policy={c.table.policy}, optimizer={c.optimizer.kind}, size={self.table.size()}"
