"""Planning and sharding dynamic tables without a process group: what the planner picks, and the clear errors for
plans and optimizers a dynamic table cannot take."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.planner import Topology
from torchrec.distributed.types import ParameterSharding, ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from gr_dynemb import FusedOptimizerConfig
from gr_dynemb.distributed import (
    DYNAMIC_KERNEL,
    DynamicEmbeddingCollectionSharder,
    DynamicEmbeddingShardingPlanner,
    DynamicParameterConstraints,
    DynamicParameterSharding,
    DynamicTableOptions,
    ShardedDynamicEmbeddingCollection,
)

SGD = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}


def collection(device: str = "cpu") -> EmbeddingCollection:
    return EmbeddingCollection(
        tables=[
            EmbeddingConfig(name="static", embedding_dim=4, num_embeddings=16, feature_names=["s"]),
            EmbeddingConfig(name="dyn", embedding_dim=4, num_embeddings=64, feature_names=["d"]),
        ],
        device=torch.device(device),
    )


def dynamic_only() -> EmbeddingCollection:
    return EmbeddingCollection(
        tables=[EmbeddingConfig(name="dyn", embedding_dim=3, num_embeddings=64, feature_names=["d"])],
        device=torch.device("cpu"),
    )


def one_rank() -> ShardingEnv:
    return ShardingEnv(world_size=1, rank=0, pg=None)


def dyn_entry(sharding_type: str = "row_wise", **options: object) -> DynamicParameterSharding:
    return DynamicParameterSharding(
        sharding_type=sharding_type, compute_kernel=DYNAMIC_KERNEL, ranks=[0], dynamic=DynamicTableOptions(**options)
    )


def test_planner_puts_marked_tables_on_the_custom_kernel_and_no_other() -> None:
    options = DynamicTableOptions(capacity=512, policy="lfu")
    planner = DynamicEmbeddingShardingPlanner(
        Topology(world_size=2, compute_device="cpu"), constraints={"dyn": DynamicParameterConstraints(dynamic=options)}
    )
    plan = planner.plan(collection("meta"), [DynamicEmbeddingCollectionSharder(fused_params=SGD)])
    entries = plan.plan[""]
    assert entries["dyn"].compute_kernel == DYNAMIC_KERNEL and entries["dyn"].sharding_type == "row_wise"
    assert isinstance(entries["dyn"], DynamicParameterSharding) and entries["dyn"].dynamic == options
    # The sharder offers the custom kernel for every row-wise table; the planner keeps unmarked tables off it.
    assert entries["static"].compute_kernel != DYNAMIC_KERNEL
    assert not isinstance(entries["static"], DynamicParameterSharding)


def test_constraints_reject_other_kernels_and_sharding_types() -> None:
    with pytest.raises(ValueError, match="compute_kernels must be"):
        DynamicParameterConstraints(compute_kernels=["fused"])
    with pytest.raises(ValueError, match="sharding_types must be"):
        DynamicParameterConstraints(sharding_types=["table_wise"])
    planner = DynamicEmbeddingShardingPlanner(
        Topology(world_size=2, compute_device="cpu"), constraints={"dyn": DynamicParameterConstraints()}
    )
    from torchrec.distributed.embedding import EmbeddingCollectionSharder

    with pytest.raises(ValueError, match="no DynamicEmbeddingCollectionSharder"):
        planner.plan(collection("meta"), [EmbeddingCollectionSharder()])
    with pytest.raises(ValueError, match="builds its own enumerator"):
        DynamicEmbeddingShardingPlanner(Topology(world_size=1, compute_device="cpu"), enumerator=object())


def test_sharder_rejects_unsupported_plans() -> None:
    sharder = DynamicEmbeddingCollectionSharder(fused_params=SGD)
    static = ParameterSharding(sharding_type="table_wise", compute_kernel="fused", ranks=[0])
    with pytest.raises(ValueError, match="sharding type 'table_wise' is not supported"):
        sharder.shard(collection(), {"dyn": dyn_entry("table_wise"), "static": static}, one_rank())
    bare = ParameterSharding(sharding_type="row_wise", compute_kernel=DYNAMIC_KERNEL, ranks=[0])
    with pytest.raises(ValueError, match="without DynamicTableOptions"):
        sharder.shard(collection(), {"dyn": bare, "static": static}, one_rank())
    with pytest.raises(ValueError, match="no entry for static tables"):
        sharder.shard(collection(), {"dyn": dyn_entry()}, one_rank())
    with pytest.raises(ValueError, match="does not have"):
        sharder.shard(dynamic_only(), {"dyn": dyn_entry(), "other": static}, one_rank())


def test_dynamic_tables_need_an_optimizer_they_can_fuse() -> None:
    plan = {"dyn": dyn_entry()}
    with pytest.raises(ValueError, match="has no fused optimizer"):
        DynamicEmbeddingCollectionSharder().shard(dynamic_only(), plan, one_rank())
    with pytest.raises(ValueError, match="has no gr_dynemb equivalent"):
        DynamicEmbeddingCollectionSharder(fused_params={"optimizer": EmbOptimType.LAMB}).shard(
            dynamic_only(), plan, one_rank()
        )
    with pytest.raises(ValueError, match="weight_decay"):
        DynamicEmbeddingCollectionSharder(fused_params={**SGD, "weight_decay": 0.1}).shard(
            dynamic_only(), plan, one_rank()
        )
    ec = dynamic_only()
    apply_optimizer_in_backward(torch.optim.RMSprop, ec.parameters(), {"lr": 0.1})
    with pytest.raises(ValueError, match="RMSprop cannot run fused"):
        DynamicEmbeddingCollectionSharder().shard(ec, plan, one_rank())
    # A torch optimizer the table can fuse is taken over, with its hyper-parameters.
    ec = dynamic_only()
    apply_optimizer_in_backward(torch.optim.Adam, ec.parameters(), {"lr": 0.2, "betas": (0.8, 0.9)})
    sharded = DynamicEmbeddingCollectionSharder().shard(ec, plan, one_rank())
    assert sharded.dynamic_tables["dyn"].config.optimizer == FusedOptimizerConfig("adam", lr=0.2, beta1=0.8, beta2=0.9)
    # The table's own optimizer wins over the sharder's fused_params.
    own = {"dyn": dyn_entry(optimizer=FusedOptimizerConfig("rowwise_adagrad", lr=0.3))}
    sharded = DynamicEmbeddingCollectionSharder(fused_params=SGD).shard(dynamic_only(), own, one_rank())
    assert sharded.dynamic_tables["dyn"].config.optimizer.kind == "rowwise_adagrad"


def test_one_rank_collection_trains_like_a_dynamic_embedding_and_rejects_unknown_features() -> None:
    sharded = DynamicEmbeddingCollectionSharder(fused_params=SGD).shard(
        dynamic_only(), {"dyn": dyn_entry()}, one_rank()
    )
    assert isinstance(sharded, ShardedDynamicEmbeddingCollection)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["d"], values=torch.tensor([9, 2**60, 9]), lengths=torch.tensor([2, 1])
    )
    out = sharded(kjt).wait()["d"]
    assert out.lengths().tolist() == [2, 1] and out.values().shape == (3, 3)
    before = out.values().detach().clone()
    out.values().sum().backward()
    after = sharded(kjt).wait()["d"].values().detach()
    torch.testing.assert_close(after[0], before[0] - 0.1 * 2)  # id 9 twice: one fused SGD step with both gradients
    torch.testing.assert_close(after[1], before[1] - 0.1)
    with pytest.raises(KeyError, match="have no table"):
        sharded(KeyedJaggedTensor.from_lengths_sync(keys=["x"], values=torch.tensor([1]), lengths=torch.tensor([1])))


def test_sharded_dumps_must_be_complete(tmp_path) -> None:
    from gr_dynemb import DynamicEmbeddingCollection, DynamicEmbeddingConfig, DynamicTable, DynamicTableConfig
    from gr_dynemb.checkpoint import dump_table
    from gr_dynemb.distributed import dump_sharded, load_sharded, shard_paths

    cfg = DynamicEmbeddingConfig(DynamicTableConfig(dim=3, capacity=128), FusedOptimizerConfig("sgd", lr=0.1))
    coll = DynamicEmbeddingCollection([DynamicTable("dyn", ["d"], cfg)])
    coll(KeyedJaggedTensor.from_lengths_sync(keys=["d"], values=torch.tensor([4, 5]), lengths=torch.tensor([2])))
    assert dump_sharded(coll, tmp_path / "one") == {"dyn": 2}
    assert [p.name for p in shard_paths(tmp_path / "one", "dyn")] == ["rank0-of-1.pt"]
    dump_table(coll.table("dyn").table, tmp_path / "one" / "dyn" / "rank0-of-2.pt")
    with pytest.raises(ValueError, match="more than one world size, or some ranks missing"):
        load_sharded(coll, tmp_path / "one")
    with pytest.raises(FileNotFoundError, match="no dumps of table 'dyn'"):
        load_sharded(coll, tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no dynamic table"):
        dump_sharded(torch.nn.Linear(2, 2), tmp_path / "x")


def test_several_dynamic_tables_share_one_exchange() -> None:
    from gr_dynemb import DynamicEmbedding, InitializerConfig

    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(name="users", embedding_dim=3, num_embeddings=64, feature_names=["a"]),
            EmbeddingConfig(name="goods", embedding_dim=3, num_embeddings=64, feature_names=["b", "c"]),
        ],
        device=torch.device("cpu"),
    )
    plan = {"users": dyn_entry(initializer=InitializerConfig("uniform", seed=11)), "goods": dyn_entry()}
    sharded = DynamicEmbeddingCollectionSharder(fused_params=SGD).shard(ec, plan, one_rank())
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["b", "a", "c"], values=torch.tensor([1, 2, 3, 1, 4]), lengths=torch.tensor([2, 0, 1, 1, 1, 0])
    )
    out = sharded(kjt).wait()
    assert list(out) == ["a", "b", "c"]  # the collection's feature order, like TorchRec's
    assert [out[f].lengths().tolist() for f in "abc"] == [[1, 1], [2, 0], [1, 0]]
    twin = {name: DynamicEmbedding(sharded.dynamic_tables[name].config) for name in ("users", "goods")}
    torch.testing.assert_close(out["a"].values(), twin["users"](torch.tensor([3, 1])))
    torch.testing.assert_close(out["b"].values(), twin["goods"](torch.tensor([1, 2])))
    torch.testing.assert_close(out["c"].values(), twin["goods"](torch.tensor([4])))
    (out["a"].values().sum() + 2 * out["b"].values().sum() + out["c"].values().sum()).backward()
    after, _ = sharded.dynamic_tables["goods"].table.find(torch.tensor([1]))
    torch.testing.assert_close(after[0, :3], out["b"].values()[0].detach() - 0.1 * 2)
    after, _ = sharded.dynamic_tables["users"].table.find(torch.tensor([1]))  # same id, other table: own row
    torch.testing.assert_close(after[0, :3], out["a"].values()[1].detach() - 0.1)
