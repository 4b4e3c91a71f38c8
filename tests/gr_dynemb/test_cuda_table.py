"""The CUDA table against its CPU twin: every operation and policy, duplicates, growth, the host-memory tier,
DynamicEmbedding training on CUDA, checkpoints and bad input. Skipped without a GPU (except the no-GPU error)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_dynemb import (
    BUCKET_SIZE,
    EVICTED,
    FOUND,
    INSERTED,
    REJECTED,
    DynamicEmbedding,
    DynamicEmbeddingConfig,
    DynamicHashTable,
    DynamicTableConfig,
    FusedOptimizerConfig,
    InitializerConfig,
    TableFullError,
    cuda_available,
)
from gr_dynemb.checkpoint import dump_table, load_table

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
POLICIES = ["lru", "lfu", "epoch_lru", "epoch_lfu"]


def needs_gpu(fn):  # a test decorator: gpu mark + skip without CUDA
    skip = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and gr_dynemb's CUDA build")
    return pytest.mark.gpu(skip(fn))


def twins(dim: int, state_dim: int = 0, **kw: object) -> tuple[DynamicHashTable, DynamicHashTable]:
    cpu = DynamicHashTable(DynamicTableConfig(dim=dim, num_threads=1, **kw), state_dim=state_dim)  # type: ignore[arg-type]
    gpu = DynamicHashTable(DynamicTableConfig(dim=dim, device="cuda", **kw), state_dim=state_dim)  # type: ignore[arg-type]
    return cpu, gpu


def contents(t: DynamicHashTable) -> dict[int, tuple[list[float], int]]:
    keys, values, scores = t.export_to_host()
    return {
        k: (v, s) for k, v, s in zip(keys.tolist(), values.tolist(), scores.view(torch.int64).tolist(), strict=True)
    }


def assert_same_contents(a: DynamicHashTable, b: DynamicHashTable) -> None:
    """Same keys with the same scores, rows equal to fp32 rounding."""
    ca, cb = contents(a), contents(b)
    assert ca.keys() == cb.keys()
    for k, (v, s) in cb.items():
        assert ca[k][1] == s, k
        assert ca[k][0] == pytest.approx(v, rel=1e-6, abs=1e-6), k


def same_clocks(a: DynamicHashTable, b: DynamicHashTable, step: int, epoch: int) -> None:
    for t in (a, b):
        t.set_step(step)
        t.set_epoch(epoch)


def cuda(x: torch.Tensor) -> torch.Tensor:
    return x.to("cuda")


@pytest.mark.parametrize("policy", POLICIES)
@needs_gpu
def test_ops_match_the_cpu_twin(policy: str) -> None:
    _twin_run(policy, seed=0, steps=12)


@needs_gpu
@settings(max_examples=15, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), policy=st.sampled_from(POLICIES))
def test_random_op_sequences_match_the_cpu_twin(seed: int, policy: str) -> None:
    _twin_run(policy, seed=seed, steps=8)


def _twin_run(policy: str, seed: int, steps: int) -> None:
    # Unique keys per batch and no eviction (max_capacity large): the outcome is then independent of the order in
    # which the GPU inserts, so everything must match the CPU table exactly (values to fp32 rounding).
    gen = torch.Generator().manual_seed(seed)
    pool = torch.cat([torch.randint(INT64_MIN + 2, INT64_MAX, (400,), generator=gen), torch.tensor([INT64_MAX, 0])])
    cpu, gpu = twins(3, state_dim=2, capacity=128, max_capacity=1 << 14, policy=policy, max_load_factor=0.6)
    for step in range(1, steps + 1):
        same_clocks(cpu, gpu, step, step // 4)
        keys = pool[torch.randperm(pool.numel(), generator=gen)[: int(torch.randint(1, 200, (1,), generator=gen))]]
        rows = torch.randn(keys.numel(), 5, generator=gen)
        v_cpu, s_cpu = cpu.find_or_insert(keys)
        v_gpu, s_gpu = gpu.find_or_insert(cuda(keys))
        torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=1e-6, atol=1e-7)
        assert torch.equal(s_gpu.cpu(), s_cpu)
        half = keys[: keys.numel() // 2]
        assert torch.equal(gpu.insert_or_assign(cuda(keys), cuda(rows)).cpu(), cpu.insert_or_assign(keys, rows))
        assert torch.equal(
            gpu.assign(cuda(half), cuda(rows[: half.numel()] * 2)).cpu(), cpu.assign(half, rows[: half.numel()] * 2)
        )
        assert torch.equal(
            gpu.accumulate(cuda(half), cuda(rows[: half.numel()])).cpu(), cpu.accumulate(half, rows[: half.numel()])
        )
        probe = pool[torch.randperm(pool.numel(), generator=gen)[:64]]
        f_cpu = cpu.find(probe, touch=True)
        f_gpu = gpu.find(cuda(probe), touch=True)
        torch.testing.assert_close(f_gpu[0].cpu(), f_cpu[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(f_gpu[1].cpu(), f_cpu[1])
        gone = pool[torch.randperm(pool.numel(), generator=gen)[:20]]
        assert gpu.erase(cuda(gone)) == cpu.erase(gone)
        assert gpu.size() == cpu.size() and gpu.capacity() == cpu.capacity()
        assert gpu.load_factor() == pytest.approx(cpu.load_factor())
        assert_same_contents(gpu, cpu)
    threshold = int(torch.tensor([s for _, s in contents(cpu).values()]).median())
    assert gpu.erase_if(threshold) == cpu.erase_if(threshold)
    assert contents(gpu).keys() == contents(cpu).keys()


@needs_gpu
def test_export_threshold_clear_and_reserve() -> None:
    cpu, gpu = twins(4, capacity=256, max_capacity=1 << 12, policy="lru")
    keys = torch.arange(1, 301, dtype=torch.int64) * 7919
    for step, part in enumerate(keys.split(100), start=1):
        same_clocks(cpu, gpu, step, 0)
        cpu.find_or_insert(part)
        gpu.find_or_insert(cuda(part))
    k_cpu, v_cpu, s_cpu = cpu.export(2)
    k_gpu, v_gpu, s_gpu = gpu.export(2)
    assert k_gpu.device.type == "cuda" and s_gpu.dtype == torch.uint64
    order = torch.argsort(k_gpu.cpu())
    ref = torch.argsort(k_cpu)
    assert torch.equal(k_gpu.cpu()[order], k_cpu[ref]) and k_cpu.numel() == 200
    torch.testing.assert_close(v_gpu.cpu()[order], v_cpu[ref])
    assert torch.equal(s_gpu.view(torch.int64).cpu()[order], s_cpu.view(torch.int64)[ref])
    gpu.reserve(5000)
    cpu.reserve(5000)
    assert gpu.capacity() == cpu.capacity() == 4096 and contents(gpu).keys() == contents(cpu).keys()
    gpu.clear()
    assert gpu.size() == 0 and gpu.export()[0].numel() == 0
    assert not bool(gpu.find(cuda(keys))[1].any())


@needs_gpu
def test_duplicates_in_one_batch_insert_once_and_accumulate_adds_up() -> None:
    _, gpu = twins(4, capacity=1 << 12, max_capacity=1 << 20)
    distinct = torch.randint(0, 2**62, (5000,))
    keys = distinct[torch.randint(0, 5000, (1 << 16,))]  # every key ~13 times, in one batch
    values, status = gpu.find_or_insert(cuda(keys))
    status = status.cpu()
    present = torch.unique(keys)
    assert gpu.size() == present.numel()
    inserted = keys[status == INSERTED]
    assert inserted.numel() == present.numel() and torch.equal(torch.sort(inserted).values, present)
    assert bool(((status == INSERTED) | (status == FOUND)).all())
    torch.testing.assert_close(values, gpu.initial_rows(cuda(keys)), rtol=0, atol=0)  # every copy: the new row
    ones = torch.ones(keys.numel(), 4, device="cuda")
    before = gpu.find(cuda(present))[0]
    gpu.accumulate(cuda(keys), ones)
    counts = torch.bincount(torch.searchsorted(present, keys), minlength=present.numel()).float()
    torch.testing.assert_close(gpu.find(cuda(present))[0].cpu(), before.cpu() + counts[:, None])
    rows = torch.randn(keys.numel(), 4)
    gpu.insert_or_assign(cuda(keys), cuda(rows))
    got = gpu.find(cuda(keys))[0].cpu()
    # Each key holds the row of one of its copies (the last writer): at least one copy's own row is its value.
    own = (got == rows).all(1).float()
    _, inverse = torch.unique(keys, return_inverse=True)
    assert bool((torch.zeros(present.numel()).index_add_(0, inverse, own) >= 1).all())


@pytest.mark.parametrize("policy", [*POLICIES, "custom"])
@needs_gpu
def test_eviction_and_rejection_match_the_cpu_twin(policy: str) -> None:
    # One bucket (capacity = max_capacity = 128), filled, then newcomers one per call: the order is fixed, so the
    # victims, rejections and counts must be the CPU table's.
    cpu, gpu = twins(2, capacity=BUCKET_SIZE, max_capacity=BUCKET_SIZE, policy=policy, max_load_factor=1.0)
    gen = torch.Generator().manual_seed(1)
    keys = torch.randint(INT64_MIN + 2, INT64_MAX, (BUCKET_SIZE + 80,), generator=gen)
    for i in range(keys.numel()):
        same_clocks(cpu, gpu, 1 + i // 16, i // 64)
        key = keys[i : i + 1]
        if i % 2 and i > 10:  # touch an older key: LRU/LFU scores move
            old = keys[i // 3 : i // 3 + 1]
            assert torch.equal(gpu.find(cuda(old), touch=True)[1].cpu(), cpu.find(old, touch=True)[1])
        scores = torch.randint(0, 50, (1,), generator=gen) if policy == "custom" else None
        _, s_cpu = cpu.find_or_insert(key, scores=scores)
        _, s_gpu = gpu.find_or_insert(cuda(key), scores=None if scores is None else cuda(scores))
        assert int(s_gpu[0]) == int(s_cpu[0]), (i, policy)
        assert_same_contents(gpu, cpu)
    assert gpu.evicted_count == cpu.evicted_count
    assert gpu.rejected_count == cpu.rejected_count
    assert cpu.evicted_count + cpu.rejected_count == keys.numel() - BUCKET_SIZE  # every newcomer past 128 was one
    assert gpu.size() == cpu.size() == BUCKET_SIZE


@needs_gpu
def test_full_bucket_in_one_batch_keeps_the_highest_scores() -> None:
    # Whatever order the GPU takes the newcomers in, the bucket ends with the 128 highest scores: a rejected key
    # scored at most the bucket's minimum then, an evicted one was that minimum, and the minimum only rises.
    cpu, gpu = twins(2, capacity=BUCKET_SIZE, max_capacity=BUCKET_SIZE, policy="custom", max_load_factor=1.0)
    old = torch.arange(1, BUCKET_SIZE + 1, dtype=torch.int64)
    new = torch.arange(1000, 1064, dtype=torch.int64)
    old_scores, new_scores = old * 10, (new - 999) * 10 - 5  # 10..1280 and 5..635: distinct
    for t, dev in ((cpu, "cpu"), (gpu, "cuda")):
        t.insert_or_assign(old.to(dev), torch.zeros(BUCKET_SIZE, 2, device=dev), scores=old_scores.to(dev))
        status = t.insert_or_assign(new.to(dev), torch.ones(64, 2, device=dev), scores=new_scores.to(dev)).cpu()
        assert t.size() == BUCKET_SIZE
        assert int(((status == EVICTED) | (status == REJECTED)).sum()) == 64
        assert int((status == REJECTED).sum()) == t.rejected_count
        _, _, scores = t.export_to_host()
        expected = sorted(x for x in [*old_scores.tolist(), *new_scores.tolist()] if x > 320)
        assert sorted(scores.view(torch.int64).tolist()) == expected
    assert_same_contents(gpu, cpu)


@needs_gpu
def test_no_eviction_policy_raises_when_full() -> None:
    _, gpu = twins(2, capacity=BUCKET_SIZE, max_capacity=BUCKET_SIZE, policy="none", max_load_factor=1.0)
    gpu.find_or_insert(cuda(torch.arange(1, BUCKET_SIZE + 1)))
    with pytest.raises(TableFullError, match="policy='none' never evicts"):
        gpu.find_or_insert(cuda(torch.tensor([10**9])))


@pytest.mark.parametrize(
    "init",
    [
        InitializerConfig("normal", mean=0.5, std=2.0, seed=3),
        InitializerConfig("truncated_normal", std=0.3, seed=11),
        InitializerConfig("uniform", low=-0.2, high=0.7, seed=5),
        InitializerConfig("constant", value=1.25),
    ],
)
@pytest.mark.parametrize("dim", [1, 7, 64])
@needs_gpu
def test_initializer_rows_match_the_cpu_table(init: InitializerConfig, dim: int) -> None:
    cpu, gpu = twins(dim, state_dim=3, initializer=init)
    keys = torch.cat([torch.randint(INT64_MIN + 2, INT64_MAX, (300,)), torch.tensor([INT64_MAX, 0, -1])])
    rows_cpu, rows_gpu = cpu.initial_rows(keys), gpu.initial_rows(cuda(keys)).cpu()
    torch.testing.assert_close(rows_gpu, rows_cpu, rtol=1e-6, atol=1e-7)
    assert float((rows_gpu == rows_cpu).float().mean()) > 0.99  # same draws, same float arithmetic: bit-equal
    torch.testing.assert_close(gpu.find_or_insert(cuda(keys))[0].cpu(), rows_cpu, rtol=1e-6, atol=1e-7)


@needs_gpu
def test_growth_rehashes_on_device_and_keeps_rows() -> None:
    cpu, gpu = twins(8, capacity=BUCKET_SIZE, max_capacity=1 << 16, max_load_factor=0.5)
    keys = torch.randint(INT64_MIN + 2, INT64_MAX, (20000,))
    rows = torch.randn(keys.numel(), 8)
    for part, vals in zip(keys.split(3000), rows.split(3000), strict=True):
        gpu.insert_or_assign(cuda(part), cuda(vals))
        cpu.insert_or_assign(part, vals)
        assert gpu.capacity() == cpu.capacity()
    assert gpu.size() == 20000 and gpu.capacity() == 1 << 16
    values, found = gpu.find(cuda(keys))
    assert bool(found.all()) and torch.equal(values.cpu(), rows)


@pytest.mark.parametrize("budget_rows", [0, 3 * BUCKET_SIZE])
@needs_gpu
def test_hybrid_tier_equals_hbm_mode(budget_rows: int) -> None:
    dim, state = 16, 16
    # Load factor <= 0.5 keeps every bucket below full, so nothing is evicted: which of two same-step keys takes a
    # bucket's last slot depends on thread order on the GPU, and that race is not what this test compares.
    hbm = DynamicHashTable(
        DynamicTableConfig(dim=dim, capacity=1024, max_capacity=1 << 14, max_load_factor=0.5, device="cuda"), state
    )
    hyb = DynamicHashTable(
        DynamicTableConfig(
            dim=dim,
            capacity=1024,
            max_capacity=1 << 14,
            max_load_factor=0.5,
            device="cuda",
            hbm_budget_bytes=budget_rows * (dim + state) * 4,
        ),
        state,
    )
    assert hyb.hbm_rows() == budget_rows and hbm.hbm_rows() == hbm.capacity()
    gen = torch.Generator().manual_seed(2)
    keys = torch.randint(INT64_MIN + 2, INT64_MAX, (6000,), generator=gen)
    for step, part in enumerate(keys.split(1000), start=1):
        for t in (hbm, hyb):
            t.set_step(step)
        a, sa = hbm.find_or_insert(cuda(part))
        b, sb = hyb.find_or_insert(cuda(part))
        assert torch.equal(a, b) and torch.equal(sa, sb)
        assert not bool((sa == EVICTED).any()), "a bucket filled up: the test's load-factor bound is off"
        delta = torch.randn(part.numel(), dim + state, generator=gen).cuda()
        hbm.accumulate(cuda(part), delta)
        hyb.accumulate(cuda(part), delta)
    assert hyb.capacity() > 1024 and hyb.hbm_rows() == budget_rows  # grew: the new host tier holds the rest
    assert torch.equal(hbm.find(cuda(keys))[0], hyb.find(cuda(keys))[0])
    # With a host tier, find reads rows in slot order (locate, sort, gather): same rows, flags and touched scores,
    # zero rows for absent keys, in the keys' order.
    probe = torch.cat([keys[:500], torch.randint(INT64_MIN + 2, INT64_MAX, (200,), generator=gen)])
    probe = cuda(probe[torch.randperm(probe.numel(), generator=gen)])
    for t in (hbm, hyb):
        t.set_step(9)
    want, got = hbm.find_with_scores(probe, touch=True), hyb.find_with_scores(probe, touch=True)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)) and int(got[1].sum()) >= 500
    assert not bool(got[0][~got[1]].any())
    assert contents(hbm) == contents(hyb)
    hyb.erase(cuda(keys[:3000]))
    hbm.erase(cuda(keys[:3000]))
    assert contents(hbm) == contents(hyb) and hyb.size() == 3000


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
@needs_gpu
def test_dynamic_embedding_on_cuda_matches_cpu(kind: str) -> None:
    def make(device: str) -> DynamicEmbedding:
        table = DynamicTableConfig(dim=8, capacity=256, max_capacity=1 << 14, device=device)
        return DynamicEmbedding(DynamicEmbeddingConfig(table=table, optimizer=FusedOptimizerConfig(kind, lr=0.05)))

    cpu, gpu = make("cpu"), make("cuda")
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):
        ids = torch.randint(-50, 50, (32, 5), generator=gen)
        target = torch.randn(32, 5, 8, generator=gen)
        out_cpu, out_gpu = cpu(ids), gpu(ids.cuda())
        assert out_gpu.device.type == "cuda"
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-5)
        ((out_cpu - target) ** 2).sum().backward()
        ((out_gpu - target.cuda()) ** 2).sum().backward()
    c_cpu, c_gpu = contents(cpu.table), contents(gpu.table)
    assert c_gpu.keys() == c_cpu.keys()
    for k, (v, s) in c_cpu.items():
        assert c_gpu[k][0] == pytest.approx(v, rel=1e-4, abs=1e-5) and c_gpu[k][1] == s
    cpu.eval()
    gpu.eval()
    everything = torch.arange(-60, 60)
    torch.testing.assert_close(gpu(everything.cuda()).cpu(), cpu(everything), rtol=1e-4, atol=1e-5)


@needs_gpu
def test_admission_on_cuda() -> None:
    table = DynamicTableConfig(dim=4, device="cuda")
    emb = DynamicEmbedding(DynamicEmbeddingConfig(table=table, admit_after=2))
    ids = torch.tensor([5, 6, 5]).cuda()
    emb(ids).sum().backward()
    assert emb.table.size() == 0
    emb(ids).sum().backward()
    assert emb.table.size() == 2


@needs_gpu
def test_checkpoints_move_between_cuda_and_cpu_tables(tmp_path: Path) -> None:
    cpu, gpu = twins(3, state_dim=1, capacity=256, policy="lfu")
    keys = torch.randint(0, 2**40, (700,))
    gpu.find_or_insert(cuda(keys))
    gpu.find(cuda(keys[:100]), touch=True)
    assert dump_table(gpu, tmp_path / "g.pt") == gpu.size()
    load_table(cpu, tmp_path / "g.pt")
    assert contents(cpu) == contents(gpu)
    gpu.clear()
    dump_table(cpu, tmp_path / "c.pt")
    load_table(gpu, tmp_path / "c.pt")
    assert contents(gpu) == contents(cpu)
    emb = DynamicEmbedding(DynamicEmbeddingConfig(table=DynamicTableConfig(dim=4, device="cuda")))
    emb(torch.arange(10).cuda()).sum().backward()
    state = emb.state_dict()
    assert state["table_keys"].device.type == "cpu"
    back = DynamicEmbedding(DynamicEmbeddingConfig(table=DynamicTableConfig(dim=4, device="cuda")))
    back.load_state_dict(state)
    assert contents(back.table) == contents(emb.table) and back.step == emb.step


@needs_gpu
def test_collection_on_cuda() -> None:
    torchrec = pytest.importorskip("torchrec")
    from gr_dynemb import DynamicEmbeddingCollection, DynamicTable

    cfg = DynamicEmbeddingConfig(table=DynamicTableConfig(dim=4, device="cuda"))
    ec = DynamicEmbeddingCollection([DynamicTable("items", ["item", "hist"], cfg)])
    kjt = torchrec.KeyedJaggedTensor.from_lengths_sync(
        keys=["item", "hist"], values=torch.tensor([1, 2, 3, 2, 9]).cuda(), lengths=torch.tensor([1, 1, 2, 1]).cuda()
    )
    out = ec(kjt)
    assert out["item"].values().device.type == "cuda" and out["hist"].values().shape == (3, 4)
    torch.testing.assert_close(out["item"].values()[1], out["hist"].values()[1])  # id 2 in both features


@needs_gpu
def test_bad_input_names_the_problem_on_cuda() -> None:
    _, gpu = twins(2)
    with pytest.raises(ValueError, match="lives on cuda"):
        gpu.find(torch.tensor([1]))
    with pytest.raises(ValueError, match="reserved"):
        gpu.find_or_insert(cuda(torch.tensor([1, INT64_MIN])))
    with pytest.raises(TypeError, match="int64"):
        gpu.find(cuda(torch.tensor([1], dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"values must be \[1, 2\]"):
        gpu.insert_or_assign(cuda(torch.tensor([1])), torch.zeros(1, 3, device="cuda"))
    with pytest.raises(ValueError, match="hbm_budget_bytes must be >= 0"):
        DynamicTableConfig(dim=2, device="cuda", hbm_budget_bytes=-1)


def test_an_nvcc_machine_built_the_cuda_table() -> None:
    # The build is "auto": where nvcc is on PATH (and GR_DYNEMB_CUDA is not "off") the CUDA table must be in.
    from gr_dynemb import _C

    if shutil.which("nvcc") is None or os.environ.get("GR_DYNEMB_CUDA", "auto").lower() == "off":
        pytest.skip("no nvcc here (or GR_DYNEMB_CUDA=off): a CPU-only build is expected")
    assert _C.WITH_CUDA and hasattr(_C, "CudaTable")


def test_find_touch_keeps_custom_scores_on_the_cpu_table() -> None:
    # find(touch=True) brings no scores: a custom-score table keeps the caller's (it used to read a null pointer).
    t = DynamicHashTable(DynamicTableConfig(dim=2, policy="custom"))
    t.insert_or_assign(torch.tensor([4, 5]), torch.zeros(2, 2), scores=torch.tensor([7, 9]))
    assert bool(t.find(torch.tensor([4, 5]), touch=True)[1].all())
    assert sorted(t.export()[2].view(torch.int64).tolist()) == [7, 9]


def test_cuda_table_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="hbm_budget_bytes is for CUDA tables"):
        DynamicTableConfig(dim=2, hbm_budget_bytes=1024)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        DynamicTableConfig(dim=2, device="meta")
    if cuda_available():
        pytest.skip("a GPU is present: the no-GPU error cannot happen here")
    with pytest.raises(RuntimeError, match="CUDA"):
        DynamicHashTable(DynamicTableConfig(dim=2, device="cuda"))
