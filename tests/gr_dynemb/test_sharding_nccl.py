"""Dynamic tables in TorchRec's DistributedModelParallel on CUDA/NCCL: each rank on its own GPU (cuda:rank), a model
mixing a static table (TorchRec's fused kernel: FBGEMM's TBE, Adam on CUDA) and a dynamic gr_dynemb table on the
rank's GPU, sharded by key hash. Against the single-process CPU reference: equal losses every step and equal lookups
at the end on 2 ranks (and 4 where 4 GPUs are visible); a state_dict round trip, a model nesting the collection next
to a DDP-wrapped dense layer and TorchRec's train pipeline (its own CUDA streams) on 2 ranks; per-rank dumps written
on 2 ranks load into a 1-rank model (and a 4-rank one) with the same lookups.

The rank workers are the CPU tests' (test_sharding_workers.py, run with ``device="cuda"``). The re-shard chain also
runs on CPU/gloo here (``cpu-gloo``), so CI checks this file's worker arguments and the 1-rank DMP path without a GPU.
Tolerances: see ``tolerances`` in the workers (lookups 5e-6 absolute on CUDA vs 1e-6 on the CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_dynemb import cuda_available
from tests.gr_dynemb.test_sharding_workers import spawn, worker_train_dump, worker_train_load, worker_train_state_dict

# device -> (process-group backend, optimizer scenario): FBGEMM's TBE has Adam on CUDA only, so the CPU run trains
# its static table with Adagrad (see ``optimizers`` in the workers).
SETUP = {"cpu": ("gloo", "adam"), "cuda": ("nccl", "adam_tbe")}


def unless_gpus(n: int) -> pytest.MarkDecorator:
    """Skips unless ``n`` GPUs, NCCL and gr_dynemb's CUDA build are all here."""
    if not cuda_available():
        missing = "gr_dynemb's CUDA build and a GPU"
    elif not dist.is_nccl_available():
        missing = "NCCL"
    else:
        missing = f"{n} GPUs (found {torch.cuda.device_count()})" if torch.cuda.device_count() < n else ""
    return pytest.mark.skipif(bool(missing), reason=f"needs {missing}")


def run(world_size: int, worker, tmp: Path, device: str) -> None:
    backend, kind = SETUP[device]
    spawn(world_size, worker, tmp, kind, device, backend=backend)


CPU = pytest.param("cpu", id="cpu-gloo")
CUDA_2 = pytest.param("cuda", id="cuda-nccl", marks=[pytest.mark.gpu, unless_gpus(2)])
CUDA_4 = pytest.param("cuda", id="cuda-nccl", marks=[pytest.mark.gpu, unless_gpus(4)])


@pytest.mark.gpu
@unless_gpus(2)
def test_two_ranks_train_state_dict_dense_and_pipeline_on_nccl(tmp_path: Path) -> None:
    run(2, worker_train_state_dict, tmp_path, "cuda")


@pytest.fixture(scope="module", params=[CPU, CUDA_2])
def two_rank_dumps(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Trains on 2 ranks of ``device`` (asserting parity with one process) and dumps the dynamic table there."""
    device = request.param
    tmp = tmp_path_factory.mktemp(f"two_rank_{device}")
    run(2, worker_train_dump, tmp, device)
    assert sorted(p.name for p in (tmp / "dumps" / "dyn").iterdir()) == ["rank0-of-2.pt", "rank1-of-2.pt"]
    return tmp, device


def test_two_rank_dumps_load_into_a_one_rank_model(two_rank_dumps: tuple[Path, str]) -> None:
    """A 1-rank DMP model (its training checked against the reference too) loads the 2-rank dumps, and the old
    ranks' state dicts, with the lookups recorded on 2 ranks."""
    tmp, device = two_rank_dumps
    run(1, worker_train_load, tmp, device)


@pytest.mark.parametrize("two_rank_dumps", [CUDA_4], indirect=True)
def test_four_ranks_on_nccl_train_and_load_two_rank_dumps(two_rank_dumps: tuple[Path, str]) -> None:
    """4-rank training parity on NCCL, then the 2-rank dumps re-sharded onto 4 ranks (CPU/gloo: test_sharding.py)."""
    tmp, device = two_rank_dumps
    run(4, worker_train_load, tmp, device)


def test_static_adam_reference_is_torch_adam_on_rows_it_touches() -> None:
    """The CUDA static table's reference (FBGEMM's Adam: lazy, global step count) equals torch's dense Adam on the
    rows present every step and leaves the other rows alone."""
    from tests.gr_dynemb.test_sharding_workers import RowSparseAdam

    init = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    lazy = torch.nn.Embedding.from_pretrained(init.clone(), freeze=False, sparse=True)
    dense = torch.nn.Parameter(init[:4].clone())
    lazy_opt = RowSparseAdam(lazy.parameters(), lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8)
    dense_opt = torch.optim.Adam([dense], lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    ids = torch.tensor([0, 1, 2, 3, 1, 3])  # rows 4 and 5 never appear; 1 and 3 twice
    for step in range(5):
        target = torch.full((ids.numel(), 3), float(step))
        lazy_opt.zero_grad()
        ((lazy(ids) - target) ** 2).sum().backward()
        lazy_opt.step()
        dense_opt.zero_grad()
        ((dense[ids] - target) ** 2).sum().backward()
        dense_opt.step()
    torch.testing.assert_close(lazy.weight[:4].detach(), dense.detach())
    assert torch.equal(lazy.weight[4:].detach(), init[4:])


def test_a_cuda_table_without_index_goes_to_the_rank_gpu() -> None:
    from gr_dynemb.distributed import DynamicTableOptions
    from gr_dynemb.distributed.sharded_collection import _on_rank_device

    rank_gpu = torch.device("cuda", 1)
    assert _on_rank_device(DynamicTableOptions(device="cuda"), rank_gpu).device == "cuda:1"
    assert _on_rank_device(DynamicTableOptions(device="cuda:0"), rank_gpu).device == "cuda:0"  # pinned by the user
    assert _on_rank_device(DynamicTableOptions(device="cpu"), rank_gpu).device == "cpu"
    assert _on_rank_device(DynamicTableOptions(device="cuda"), torch.device("cpu")).device == "cuda"
    options = DynamicTableOptions(device="cuda", capacity=512)
    assert _on_rank_device(options, rank_gpu).capacity == 512 and options.device == "cuda"  # a copy, not a mutation


@settings(max_examples=40, deadline=None)
@given(
    keys=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=0, max_size=64),
    world_size=st.integers(1, 2**40),
)
def test_device_owner_hash_equals_the_native_one(keys: list[int], world_size: int) -> None:
    """The torch-op owner hash (run on GPUs, so routed ids never go to the host) gives the native owner_ranks bits."""
    from gr_dynemb import owner_ranks
    from gr_dynemb.distributed.routing import hashed_owners, owner_ranks_on_device

    t = torch.tensor(keys, dtype=torch.int64)
    want = owner_ranks(t, world_size)
    assert torch.equal(hashed_owners(t, world_size), want)
    assert torch.equal(owner_ranks_on_device(t, world_size), want)


@pytest.mark.gpu
@unless_gpus(1)
def test_owner_ranks_on_a_gpu_equal_the_native_ones() -> None:
    from gr_dynemb import owner_ranks
    from gr_dynemb.distributed.routing import owner_ranks_on_device

    keys = torch.cat([torch.randint(-(2**63), 2**63 - 1, (1 << 16,)), torch.tensor([-(2**63), 2**63 - 1, 0, -1])])
    for world_size in (1, 2, 3, 4, 8, 1000):
        got = owner_ranks_on_device(keys.cuda(), world_size)
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), owner_ranks(keys, world_size)), world_size
