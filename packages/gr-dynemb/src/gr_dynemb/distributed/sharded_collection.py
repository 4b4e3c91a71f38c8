"""``ShardedDynamicEmbeddingCollection``: a sharded TorchRec ``EmbeddingCollection`` whose dynamic tables live in
gr_dynemb tables sharded row-wise by key hash, next to TorchRec-sharded static tables.

Per step (data-parallel KJT in, data-parallel ``dict[feature, JaggedTensor]`` out, like TorchRec's sharded EC):

1. input dist: the static features go to an inner TorchRec ``ShardedEmbeddingCollection`` (its own plan and
   kernels); the ids of all dynamic features are routed to their owner ``owner_ranks(id, world_size)`` in one
   all-to-all (ids and table index together);
2. compute: each rank looks its received ids up in its shard of each dynamic table (one lookup per table per step,
   so a fused optimizer takes exactly one step per backward, whatever the batch);
3. output dist: the rows go back along the same routes (their gradients, in backward, the reverse way) and are
   put back into input order (all tables of an ``EmbeddingCollection`` share one width, so one exchange serves all).

The input dist is TorchRec's ``KJTListSplitsAwaitable`` (the static part's KJT all-to-alls, then the routed dynamic
ids), so TorchRec's train pipelines (``TrainPipelineSparseDist``) drive this module as they drive their own. The
dynamic exchanges are synchronous ``torch.distributed`` all-to-alls on the module's device (gloo on CPU, NCCL on
CUDA; owners are hashed where the ids are, see ``routing``, and a table asked for on "cuda" lives on the rank's
GPU); backward divides the returning gradients by the world size when TorchRec's gradient division is on (default),
as TorchRec's own embedding all-to-alls do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torchrec import EmbeddingCollection, JaggedTensor, KeyedJaggedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder, ShardedEmbeddingCollection
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.types import Awaitable, LazyAwaitable, ParameterSharding, ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.streamable import Multistreamable

from gr_dynemb.distributed.comm import all_to_all_rows, all_to_all_rows_autograd, exchange_counts
from gr_dynemb.distributed.options import (
    DYNAMIC_KERNEL,
    DYNAMIC_SHARDING,
    DynamicParameterSharding,
    DynamicTableOptions,
    resolve_optimizer,
)
from gr_dynemb.distributed.routing import owner_ranks_on_device
from gr_dynemb.embedding import ADMISSION_STATE, DynamicEmbedding, DynamicEmbeddingConfig
from gr_dynemb.grouped import lookup_tables
from gr_dynemb.table import owner_ranks


def _on_rank_device(options: DynamicTableOptions, device: torch.device) -> DynamicTableOptions:
    """A table asked for on "cuda" without an index lives on this rank's GPU (the device DMP shards onto), not on
    whatever GPU happens to be current: ranks sharing a host must not pile their shards onto one GPU. Explicit
    indices and CPU tables are kept as asked."""
    asked = torch.device(options.device)
    if asked.type == "cuda" and asked.index is None and device.type == "cuda" and device.index is not None:
        return dataclasses.replace(options, device=str(device))
    return options


class DynamicEmbeddingShard(DynamicEmbedding):
    """This rank's shard of a hash-sharded dynamic table. Its ``state_dict`` holds only its own keys; loading keeps
    only the keys this rank owns, so a state dict holding more (e.g. every old rank's rows) loads correctly."""

    def __init__(self, config: DynamicEmbeddingConfig, rank: int, world_size: int) -> None:
        super().__init__(config)
        self.rank, self.world_size = rank, world_size

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):  # type: ignore[override]
        for entries in (("table_keys", "table_values", "table_scores"), ADMISSION_STATE):  # rows, then counters
            names = [prefix + n for n in entries]
            if self.world_size > 1 and all(n in state_dict for n in names):
                state_dict = dict(state_dict)
                keys = state_dict[names[0]]
                mine = owner_ranks(keys.cpu(), self.world_size) == self.rank
                for n in names:
                    state_dict[n] = state_dict[n][mine.to(state_dict[n].device)]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shard={self.rank}/{self.world_size}"


class DynamicEmbeddingCollectionContext(Multistreamable):
    """Per-step routing state: the static part's TorchRec context and the dynamic ids' routes."""

    def __init__(self, static_ctx: Multistreamable | None) -> None:
        self.static_ctx = static_ctx
        self.features: list[str] = []  # input features, output order
        self.dynamic_jts: dict[str, JaggedTensor] = {}
        self.send: list[int] = []  # ids sent to each rank
        self.recv: list[int] = []  # ids received from each rank
        self.inverse: Tensor | None = None  # routed order -> input order

    @property
    def sharding_contexts(self) -> list[Any]:
        """The static part's per-sharding contexts: TorchRec's input-dist awaitables (which come first in ours)
        fill them in, in a train pipeline too."""
        return getattr(self.static_ctx, "sharding_contexts", [])

    def record_stream(self, stream: torch.Stream) -> None:
        if self.static_ctx is not None:
            self.static_ctx.record_stream(stream)
        for jt in self.dynamic_jts.values():
            jt.record_stream(stream)
        if self.inverse is not None:
            self.inverse.record_stream(stream)


class _Ready(Awaitable[Any]):
    def __init__(self, value: Any) -> None:
        super().__init__()
        self._value = value

    def _wait_impl(self) -> Any:
        return self._value


class _Merged(LazyAwaitable[dict[str, JaggedTensor]]):
    def __init__(self, static: LazyAwaitable | None, dynamic: dict[str, JaggedTensor], order: list[str]) -> None:
        super().__init__()
        self._static, self._dynamic, self._order = static, dynamic, order

    def _wait_impl(self) -> dict[str, JaggedTensor]:
        found = dict(self._dynamic)
        if self._static is not None:
            found.update(self._static.wait())
        return {f: found[f] for f in self._order}


class ShardedDynamicEmbeddingCollection(
    ShardedEmbeddingModule[Any, Any, dict[str, JaggedTensor], DynamicEmbeddingCollectionContext]
):
    """Built by ``DynamicEmbeddingCollectionSharder`` for an ``EmbeddingCollection`` whose plan puts at least one
    table on the ``CUSTOMIZED_KERNEL``; the rest of the plan goes to TorchRec's ``ShardedEmbeddingCollection``.

    Submodules: ``static`` (TorchRec's sharded EC of the static tables, absent when there are none) and
    ``dynamic[<table>]`` (this rank's ``DynamicEmbeddingShard`` of each dynamic table).
    """

    def __init__(
        self,
        module: EmbeddingCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        env: ShardingEnv,
        static_sharder: EmbeddingCollectionSharder,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=static_sharder.qcomm_codecs_registry)
        self._env = env
        self._group = env.process_group
        self._rank, self._world_size = env.rank, env.world_size
        self._device = torch.device("cpu") if device is None else torch.device(device)
        configs = module.embedding_configs()
        names = [c.name for c in configs]
        unknown = sorted(set(table_name_to_parameter_sharding) - set(names))
        if unknown:
            raise ValueError(f"the plan shards tables {unknown} that this EmbeddingCollection does not have ({names})")
        dynamic_plan = {
            n: ps for n, ps in table_name_to_parameter_sharding.items() if ps.compute_kernel == DYNAMIC_KERNEL
        }
        for name, ps in dynamic_plan.items():
            if ps.sharding_type != DYNAMIC_SHARDING:
                raise ValueError(
                    f"dynamic table {name!r}: sharding type {ps.sharding_type!r} is not supported; dynamic tables "
                    f"are sharded '{DYNAMIC_SHARDING}' by key hash"
                )
            if not isinstance(ps, DynamicParameterSharding) or ps.dynamic is None:
                raise ValueError(
                    f"table {name!r} is planned on '{DYNAMIC_KERNEL}' without DynamicTableOptions: mark it with "
                    "DynamicParameterConstraints and plan with DynamicEmbeddingShardingPlanner (or put a "
                    "DynamicParameterSharding in the plan)"
                )

        # ---- dynamic tables: one hash-sharded gr_dynemb shard per table on this rank
        self._dynamic_tables: list[str] = []
        self._table_index: dict[str, int] = {}  # dynamic feature -> index into _dynamic_tables
        self.dynamic = nn.ModuleDict()
        for cfg in configs:
            if cfg.name not in dynamic_plan:
                continue
            if cfg.data_type.value.lower() not in ("fp32", "float32"):
                raise ValueError(f"dynamic table {cfg.name!r}: only fp32 rows are supported, got {cfg.data_type}")
            options = _on_rank_device(dynamic_plan[cfg.name].dynamic, self._device)
            weight = module.embeddings[cfg.name].weight
            optimizer = resolve_optimizer(cfg.name, options, static_sharder.fused_params, weight)
            shard = DynamicEmbeddingShard(
                options.embedding_config(cfg.embedding_dim, optimizer), self._rank, self._world_size
            )
            self.dynamic[cfg.name] = shard.to(self._device)
            for f in cfg.feature_names:
                self._table_index[f] = len(self._dynamic_tables)
            self._dynamic_tables.append(cfg.name)
        self._dim = module.embedding_dim()  # TorchRec's EmbeddingCollection holds tables of one width only

        # ---- static tables: TorchRec's own sharded EC over a collection that shares the original weights
        static_configs = [c for c in configs if c.name not in dynamic_plan]
        self._static_features = [f for c in static_configs for f in c.feature_names]
        self._feature_order = [f for c in configs for f in c.feature_names]
        self.static: ShardedEmbeddingCollection | None = None
        if static_configs:
            sub = EmbeddingCollection(
                tables=static_configs, device=torch.device("meta"), need_indices=module.need_indices()
            )
            for cfg in static_configs:
                sub.embeddings[cfg.name] = module.embeddings[cfg.name]
            sub._device = module.embeddings[static_configs[0].name].weight.device
            static_plan = {n: ps for n, ps in table_name_to_parameter_sharding.items() if n not in dynamic_plan}
            missing = sorted({c.name for c in static_configs} - set(static_plan))
            if missing:
                raise ValueError(f"the plan has no entry for static tables {missing}")
            self.static = static_sharder.shard(sub, static_plan, env, device, module_fqn)

    # ------------------------------------------------------------------ ShardedModule
    def create_context(self) -> DynamicEmbeddingCollectionContext:
        return DynamicEmbeddingCollectionContext(self.static.create_context() if self.static is not None else None)

    def input_dist(
        self, ctx: DynamicEmbeddingCollectionContext, features: KeyedJaggedTensor
    ) -> KJTListSplitsAwaitable[DynamicEmbeddingCollectionContext]:
        """TorchRec's two-stage input-dist awaitable over the static part's KJT all-to-alls followed by the routed
        dynamic ids (already exchanged), so TorchRec's train pipelines can fuse and wait them like their own."""
        keys: list[str] = features.keys()
        unknown = [k for k in keys if k not in self._table_index and k not in self._static_features]
        if unknown:
            raise KeyError(f"features {unknown} have no table in this collection (features: {self._feature_order})")
        jts = features.to_dict()
        ctx.features = [f for f in self._feature_order if f in jts]
        awaitables: list[Any] = []
        if self.static is not None:
            absent = [f for f in self._static_features if f not in jts]
            if absent:
                raise KeyError(f"static features {absent} are missing from the input")
            static_kjt = KeyedJaggedTensor.from_jt_dict({f: jts[f] for f in self._static_features})
            awaitables.extend(self.static.input_dist(ctx.static_ctx, static_kjt).awaitables)
        ctx.dynamic_jts = {f: jts[f] for f in ctx.features if f in self._table_index}
        awaitables.append(_Ready(_Ready(self._route(ctx))))
        return KJTListSplitsAwaitable(awaitables, ctx)

    def _route(self, ctx: DynamicEmbeddingCollectionContext) -> Tensor:
        """Sends every dynamic id (with its table index) to its owner; returns the received ``[n, 2]`` rows."""
        device = self._device
        ids = [jt.values().to(device=device, dtype=torch.int64) for jt in ctx.dynamic_jts.values()]
        tables = [torch.full_like(v, self._table_index[f]) for f, v in zip(ctx.dynamic_jts, ids, strict=True)]
        payload = (
            torch.stack([torch.cat(ids), torch.cat(tables)], dim=1)
            if ids
            else torch.empty(0, 2, dtype=torch.int64, device=device)
        )
        if self._world_size == 1:
            ctx.send = ctx.recv = [payload.shape[0]]
            ctx.inverse = None
            return payload
        owner = owner_ranks_on_device(payload[:, 0], self._world_size)  # where the ids are: no host round trip
        order = torch.argsort(owner, stable=True)
        ctx.inverse = torch.argsort(order)
        send_counts = torch.bincount(owner, minlength=self._world_size)
        recv_counts = exchange_counts(send_counts, self._group)
        ctx.send, ctx.recv = send_counts.tolist(), recv_counts.tolist()
        return all_to_all_rows(payload[order], ctx.send, ctx.recv, self._group)

    def compute(self, ctx: DynamicEmbeddingCollectionContext, dist_input: KJTList) -> tuple[Any, Tensor]:
        """``dist_input``: the static part's KJTs, then the routed dynamic ids ``[n, 2]`` (id, table index)."""
        *static_input, routed = list(dist_input)
        static_out = self.static.compute(ctx.static_ctx, KJTList(static_input)) if self.static is not None else None
        return static_out, self._lookup(routed)

    def _lookup(self, routed: Tensor) -> Tensor:
        """Rows ``[n, dim]`` of the received ids, one lookup per table (every table, even with no ids, so the
        fused optimizers of all shards step together); training tables are looked up together
        (``gr_dynemb.grouped``). The ids are ordered by table with one sort and one host read of the counts."""
        order = torch.argsort(routed[:, 1], stable=True)
        counts = torch.bincount(routed[:, 1], minlength=len(self._dynamic_tables)).tolist()
        ids = routed[order, 0].split(counts)
        rows = lookup_tables([self.dynamic[name] for name in self._dynamic_tables], list(ids))
        by_table = torch.cat([r.reshape(-1, self._dim).float() for r in rows])
        return torch.zeros(routed.shape[0], self._dim, device=self._device).index_copy(0, order, by_table)

    def output_dist(
        self, ctx: DynamicEmbeddingCollectionContext, output: tuple[Any, Tensor]
    ) -> LazyAwaitable[dict[str, JaggedTensor]]:
        static_out, rows = output
        static_dist = self.static.output_dist(ctx.static_ctx, static_out) if self.static is not None else None
        if self._world_size > 1:
            rows = all_to_all_rows_autograd(rows, ctx.recv, ctx.send, self._group)[ctx.inverse]
        counts = [jt.values().numel() for jt in ctx.dynamic_jts.values()]
        dynamic: dict[str, JaggedTensor] = {}
        for (f, jt), emb in zip(ctx.dynamic_jts.items(), rows.split(counts), strict=True):
            dynamic[f] = JaggedTensor(values=emb, lengths=jt.lengths(), offsets=jt.offsets())
        return _Merged(static_dist, dynamic, ctx.features)

    def compute_and_output_dist(
        self, ctx: DynamicEmbeddingCollectionContext, input: Any
    ) -> LazyAwaitable[dict[str, JaggedTensor]]:
        return self.output_dist(ctx, self.compute(ctx, input))

    # ------------------------------------------------------------------ tables and optimizers
    @property
    def dynamic_tables(self) -> dict[str, DynamicEmbeddingShard]:
        """This rank's shard of every dynamic table, by table name."""
        return {n: self.dynamic[n] for n in self._dynamic_tables}  # type: ignore[misc]

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        """The static tables' fused optimizer (the dynamic tables' optimizers run inside their backward)."""
        if self.static is not None:
            return self.static.fused_optimizer
        return CombinedOptimizer([])

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size
