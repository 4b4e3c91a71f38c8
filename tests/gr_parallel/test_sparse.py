"""shard_sparse's model surgery and argument checks (no process group needed): finding tables, swapping gr-dynemb
collections for TorchRec ones with the same settings, per-table constraints and their errors; parallelize's checks.
Sharded training itself is tested in test_parallel_training.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.distributed.planner import ParameterConstraints

from gr_dynemb.distributed import DYNAMIC_KERNEL, DynamicParameterConstraints
from gr_parallel.context import ParallelConfig, ParallelContext
from gr_parallel.parallelize import ParallelizeConfig, apply_tensor_parallel, parallelize
from gr_parallel.sparse import (
    embedding_tables,
    fused_params_for,
    replicated_collections,
    resolve_constraints,
    shard_sparse,
    swap_dynamic_collections,
)
from tests.gr_parallel import parity_workers as pw

CPU = torch.device("cpu")


def layout(tp: int = 1, world: int = 1) -> ParallelContext:
    return ParallelContext(
        rank=0,
        world_size=world,
        tp_size=tp,
        dp_size=world // tp,
        tp_rank=0,
        dp_rank=0,
        tp_group=None,  # type: ignore[arg-type]
        dp_group=None,  # type: ignore[arg-type]
        device=CPU,
        backend="gloo",
        config=ParallelConfig(tp=tp),
    )


def test_tables_of_a_retrieval_model():
    assert embedding_tables(pw.make_model("static")) == {"item_table": ("input_embedding.item_embeddings", "static")}
    assert embedding_tables(pw.make_model("dynamic")) == {"item_table": ("input_embedding.item_embeddings", "dynamic")}


def test_duplicate_table_names_are_an_error():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cfg = [EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=5, feature_names=["f"])]
            self.a = EmbeddingCollection(tables=cfg, device=CPU)
            self.b = EmbeddingCollection(tables=cfg, device=CPU)

    with pytest.raises(ValueError, match="'t' appears in both a and b"):
        embedding_tables(Two())


def test_dynamic_swap_keeps_the_table_settings():
    model = pw.make_model("dynamic")
    original = model.input_embedding.item_embeddings.table("item_table").config
    constraints = swap_dynamic_collections(model, CPU)
    ec = model.input_embedding.item_embeddings
    assert isinstance(ec, EmbeddingCollection)
    (cfg,) = ec.embedding_configs()
    assert (cfg.name, cfg.feature_names, cfg.embedding_dim) == ("item_table", ["item"], pw.DIM)
    c = constraints["item_table"]
    assert isinstance(c, DynamicParameterConstraints) and c.compute_kernels == [DYNAMIC_KERNEL]
    opts = c.dynamic
    assert opts.optimizer == original.optimizer  # Adam, the trainer's lr
    assert opts.initializer == original.table.initializer  # seeded truncated normal of the static table's std
    assert (opts.capacity, opts.max_capacity, opts.policy) == (
        original.table.capacity,
        original.table.max_capacity,
        original.table.policy,
    )
    assert (opts.eval_missing, opts.admit_after) == ("initializer", 0)
    assert ec.embeddings["item_table"].weight.device.type == "meta"  # never allocated


def test_dynamic_swap_refuses_a_trained_table():
    model = pw.make_model("dynamic")
    model.input_embedding.embed_ids(torch.tensor([1, 2, 3]))  # training-mode lookup inserts rows
    with pytest.raises(ValueError, match="already holds 3 rows"):
        swap_dynamic_collections(model, CPU)
    with pytest.raises(ValueError, match="not the collection itself"):
        swap_dynamic_collections(pw.make_model("dynamic").input_embedding.item_embeddings, CPU)


def test_constraints_defaults_and_errors():
    static = embedding_tables(pw.make_model("static"))
    dynamic = embedding_tables(pw.make_model("dynamic"))
    (c,) = resolve_constraints(static, None, CPU).values()
    assert (c.sharding_types, c.compute_kernels) == (["row_wise", "table_wise"], ["fused"])
    (c,) = resolve_constraints(static, None, torch.device("cuda")).values()  # planning only: no GPU needed
    assert (c.sharding_types, c.compute_kernels) == (["row_wise", "table_wise"], None)  # planner picks the kernel
    given = {"item_table": ParameterConstraints(sharding_types=["table_wise"])}
    (c,) = resolve_constraints(static, given, CPU).values()
    assert (c.sharding_types, c.compute_kernels) == (["table_wise"], ["fused"])
    assert given["item_table"].compute_kernels is None  # the user's object is not modified
    (c,) = resolve_constraints(static, {"item_table": ParameterConstraints(sharding_types=["data_parallel"])}, CPU)
    with pytest.raises(ValueError, match=r"tables \['items'\] that the model does not have"):
        resolve_constraints(static, {"items": ParameterConstraints()}, CPU)
    with pytest.raises(ValueError, match="data_parallel must be the only sharding type"):
        resolve_constraints(
            static, {"item_table": ParameterConstraints(sharding_types=["data_parallel", "row_wise"])}, CPU
        )
    with pytest.raises(
        ValueError,
        match=r"dynamic \(hash\) table; constrain it with gr_dynemb's DynamicParameterConstraints, not a plain",
    ):
        resolve_constraints(dynamic, {"item_table": ParameterConstraints()}, CPU)
    with pytest.raises(ValueError, match="DynamicParameterConstraints are for gr-dynemb tables"):
        resolve_constraints(static, {"item_table": DynamicParameterConstraints()}, CPU)
    with pytest.raises(TypeError, match="must be a torchrec ParameterConstraints"):
        resolve_constraints(static, {"item_table": {"sharding_types": ["row_wise"]}}, CPU)  # type: ignore[dict-item]


def test_replicated_collection_must_be_whole():
    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(name="small", embedding_dim=4, num_embeddings=5, feature_names=["a"]),
            EmbeddingConfig(name="big", embedding_dim=4, num_embeddings=50, feature_names=["b"]),
        ],
        device=CPU,
    )
    model = nn.Sequential(ec)
    dp = {"small": ParameterConstraints(sharding_types=["data_parallel"])}
    with pytest.raises(ValueError, match=r"mixes data-parallel tables \['small'\] with sharded ones \['big'\]"):
        replicated_collections(model, dp)
    dp["big"] = ParameterConstraints(sharding_types=["data_parallel"])
    assert replicated_collections(model, dp) == ["0"]


def test_fused_params_for():
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    assert fused_params_for("sgd", 0.1)["optimizer"] == EmbOptimType.EXACT_SGD
    assert fused_params_for("rowwise_adagrad", 0.1)["optimizer"] == EmbOptimType.EXACT_ROWWISE_ADAGRAD
    with pytest.raises(ValueError, match="table optimizer must be one of"):
        fused_params_for("lamb", 0.1)
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        fused_params_for("sgd", 0.0)


def test_shard_sparse_argument_errors():
    with pytest.raises(ValueError, match="holds no EmbeddingCollection"):
        shard_sparse(nn.Linear(2, 2), layout())
    with pytest.raises(TypeError, match="fused_params must be a dict"):
        shard_sparse(pw.make_model("static"), layout(), fused_params=["sgd"])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"needs torch\.distributed initialised"):
        shard_sparse(pw.make_model("static"), layout())


def test_parallelize_errors():
    with pytest.raises(ValueError, match="tp=4 does not divide the HSTU encoder's num_heads=2"):
        apply_tensor_parallel(pw.make_model("static"), layout(tp=4, world=4))
    with pytest.raises(ValueError, match="needs an HSTUEncoder"):
        apply_tensor_parallel(nn.Linear(2, 2), layout(tp=2, world=2))
    with pytest.raises(ValueError, match="grad_clip must be positive"):
        ParallelizeConfig(grad_clip=0.0)
    with pytest.raises(TypeError, match="must be a ParallelizeConfig"):
        parallelize(pw.make_model("static"), layout(), {"grad_clip": 1.0})  # type: ignore[arg-type]
