"""Rank workers of the gr_parallel context and tensor-parallel tests (no tests here: test_context.py and
test_tensor_parallel.py spawn them). Workers live in an importable module because spawned ranks unpickle them by
module name. ``spawn`` (gr_dynemb's helper) initialises gloo over a file store before calling a worker; the torchrun
worker instead sets torchrun's environment and lets ``gr_parallel.initialize`` create the process group."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gr_parallel
from gr_parallel.context import ParallelConfig

# ----------------------------------------------------------------------------------------------------------------
# context


def check_layout(ctx: gr_parallel.ParallelContext, rank: int, world: int, tp: int) -> None:
    """Megatron's order: TP groups are consecutive ranks, DP groups strided by tp; both groups really talk."""
    assert (ctx.rank, ctx.world_size, ctx.tp_size, ctx.dp_size) == (rank, world, tp, world // tp)
    assert (ctx.tp_rank, ctx.dp_rank) == (rank % tp, rank // tp)
    assert ctx.tp_ranks == list(range(rank // tp * tp, rank // tp * tp + tp))
    assert ctx.dp_ranks == list(range(rank % tp, world, tp))
    assert dist.get_process_group_ranks(ctx.tp_group) == ctx.tp_ranks
    assert dist.get_process_group_ranks(ctx.dp_group) == ctx.dp_ranks
    backend = str(dist.get_backend())
    assert ctx.backend == backend
    assert ctx.device == (
        torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    )
    t = torch.tensor([float(rank)], device=ctx.device)
    dist.all_reduce(t, group=ctx.tp_group)
    assert t.item() == sum(ctx.tp_ranks)
    d = torch.tensor([float(rank) ** 2], device=ctx.device)
    dist.all_reduce(d, group=ctx.dp_group)
    assert d.item() == sum(r * r for r in ctx.dp_ranks)

    from megatron.core import parallel_state

    assert parallel_state.get_tensor_model_parallel_world_size() == tp
    assert parallel_state.get_tensor_model_parallel_rank() == rank % tp
    assert parallel_state.get_data_parallel_world_size() == world // tp
    assert parallel_state.get_data_parallel_rank() == rank // tp
    assert parallel_state.get_tensor_model_parallel_group() is ctx.tp_group


def worker_context(rank: int, world: int, tmp: Path, tps: tuple[int, ...] = (1, 2)) -> None:
    """Each tp of ``tps`` in turn, then the errors, then tp = world (so destroy + re-initialise is exercised; each
    Megatron initialisation costs seconds of gloo group set-up, hence few)."""
    with pytest.raises(RuntimeError, match="not initialised"):
        gr_parallel.get_context()
    for tp in tps:
        ctx = gr_parallel.initialize(tp=tp)
        check_layout(ctx, rank, world, tp)
        assert gr_parallel.get_context() is ctx
        # The same config again (as an object or by keyword, backend named or not) is the same context.
        assert gr_parallel.initialize(ParallelConfig(tp=tp)) is ctx
        assert gr_parallel.initialize(tp=tp, backend=ctx.backend) is ctx
        with pytest.raises(RuntimeError, match="already initialised"):
            gr_parallel.initialize(tp=world // tp if world // tp != tp else tp * 2)
        with pytest.raises(RuntimeError, match="already initialised"):
            gr_parallel.initialize(tp=tp, timeout_s=17.0)
        gr_parallel.destroy()
        with pytest.raises(RuntimeError, match="not initialised"):
            gr_parallel.get_context()
        from megatron.core import parallel_state

        assert not parallel_state.model_parallel_is_initialized()
        assert dist.is_initialized()  # the caller's process group stays
    with pytest.raises(ValueError, match="does not divide the world size"):
        gr_parallel.initialize(tp=3)
    backend = str(dist.get_backend())
    with pytest.raises(ValueError, match=f"already initialised with '{backend}'"):
        gr_parallel.initialize(tp=1, backend="nccl" if backend == "gloo" else "gloo")
    assert not gr_parallel.context.is_initialized()
    gr_parallel.destroy()  # a no-op when nothing is initialised
    # Still usable after the errors.
    check_layout(gr_parallel.initialize(tp=world), rank, world, world)
    gr_parallel.destroy()


def worker_torchrun_env(rank: int, world: int, port: int) -> None:
    """torchrun's environment, no process group yet: initialize creates it, destroy removes it."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    ctx = gr_parallel.initialize(tp=2, backend="gloo", timeout_s=60.0)
    assert dist.is_initialized()
    check_layout(ctx, rank, world, 2)
    gr_parallel.destroy()
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------------------------------------------
# tensor parallel

TOL = {"atol": 1e-5, "rtol": 1e-5}
# Where the TP workers build encoders and inputs, and the attention backend they use: set by the worker from its
# context (CPU on gloo; the rank's GPU on NCCL, where "reference" keeps the fp32 parity free of TF32 kernels).
SETUP = {"device": torch.device("cpu"), "attention": "auto"}


def encoder_config(
    heads: int, qk: int, v: int, dim: int, blocks: int, use_rab: bool, causal: bool = True, dropout: float = 0.0
):
    from gr_models.modules.hstu import HSTUConfig

    return HSTUConfig(
        embedding_dim=dim,
        num_blocks=blocks,
        num_heads=heads,
        attention_dim=qk,
        hidden_dim=v,
        max_seq_len=8,
        dropout=dropout,
        causal=causal,
        use_rab=use_rab,
        num_time_buckets=16,
        attention_backend=SETUP["attention"],
    )


def make_encoder(config, seed: int):
    from gr_models.modules.hstu import HSTUEncoder

    torch.manual_seed(seed)
    enc = HSTUEncoder(config)
    with torch.no_grad():  # non-trivial norms and biases, so their sharding is exercised
        for name, p in enc.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return enc.to(SETUP["device"])


def encoder_inputs(lengths: list[int], dim: int, seed: int, targets: bool = False) -> dict:
    """Jagged inputs; ``targets`` marks the second half of each sequence as targets (the ranking mask)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    total = int(lens.sum())
    ts = torch.randint(0, 10_000, (total,), generator=g)
    inputs = {
        "x": torch.randn(total, dim, generator=g),
        "seq_offsets": offsets,
        "max_seq_len": max(lengths),
        "timestamps": ts,
        "query_timestamps": ts + torch.randint(0, 5_000, (total,), generator=g),
        "out_weight": torch.randn(total, dim, generator=g),
        "num_targets": lens // 2 if targets else None,
    }
    return {k: v.to(SETUP["device"]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def run_encoder(enc, inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward of a fixed linear loss; returns (output, input gradient)."""
    x = inp["x"].clone().requires_grad_(True)
    out = enc(
        x,
        inp["seq_offsets"],
        inp["max_seq_len"],
        inp["timestamps"],
        inp["query_timestamps"],
        num_targets=inp["num_targets"],
    )
    (out * inp["out_weight"]).sum().backward()
    return out.detach(), x.grad


def check_replicated_grads_identical(tp_enc, ctx) -> None:
    """Every parameter without Megatron's TP attribute has the same gradient on every rank of the TP group."""
    replicated = 0
    for name, p in tp_enc.named_parameters():
        if getattr(p, "tensor_model_parallel", False):
            assert p.partition_dim in (0, 1), name
            continue
        replicated += 1
        grads = [torch.empty_like(p.grad) for _ in range(ctx.tp_size)]
        dist.all_gather(grads, p.grad.contiguous(), group=ctx.tp_group)
        for other in grads:
            assert torch.equal(other, p.grad), f"{name}: replicated gradient differs across TP ranks"
    assert replicated > 0


def check_parity(ctx, config, lengths: list[int], seed: int, targets: bool = False) -> None:
    """Forward output, input gradient and every parameter gradient of the TP encoder equal the single-device one's."""
    from gr_parallel.tensor_parallel import full_dense_grads, tensor_parallel_hstu

    ref = make_encoder(config, seed)
    tp_enc = tensor_parallel_hstu(make_encoder(config, seed), ctx)
    # Each DP group gets its own data; the TP ranks of one group share it.
    inp = encoder_inputs(lengths, config.embedding_dim, seed * 100 + ctx.dp_rank, targets)
    ref_out, ref_dx = run_encoder(ref, inp)
    out, dx = run_encoder(tp_enc, inp)
    grads = full_dense_grads(tp_enc, ctx)
    check_replicated_grads_identical(tp_enc, ctx)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(dx, ref_dx, **TOL)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert sorted(grads) == sorted(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")


def check_fused_norms(ctx) -> None:
    """``HSTUConfig.fused_norms`` (the default): the TP blocks fuse their replicated input norm (their output norm
    reduces over the TP group and stays eager) and still equal the single-device encoder, which fuses both norms.
    CPU ranks run the fused op through Triton's interpreter."""
    from unittest import mock

    import gr_kernels
    from gr_models.modules import hstu, norm_mul

    if not gr_kernels.triton_available():
        pytest.skip("Triton is not installed")
    config = encoder_config(2 * ctx.tp_size, 4, 4, 16, 2, True)
    assert config.fused_norms
    with (
        mock.patch.object(norm_mul, "INTERPRET_ON_CPU", True),
        mock.patch.object(hstu, "layer_norm_mul", wraps=norm_mul.layer_norm_mul) as fused,
        mock.patch.object(hstu, "layer_norm_residual", wraps=norm_mul.layer_norm_residual) as fused_input,
    ):
        check_parity(ctx, config, [5, 8, 1, 6], 3)
    # reference: 2 blocks x 2 norms (the input norm as layer_norm_residual: fused_residual), forward only; TP: 2 blocks
    # x the input norm (layer_norm_mul).
    assert fused.call_count + fused_input.call_count == 2 * 2 + 2, (fused.call_count, fused_input.call_count)
    assert fused_input.call_count == 2, fused_input.call_count


def check_training(ctx, config, optimizer: str, steps: int = 3) -> None:
    """A few optimizer steps keep the TP model's (gathered) parameters equal to the single-device model's."""
    from gr_parallel.tensor_parallel import full_dense_state_dict, tensor_parallel_hstu

    def make_opt(params):
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)

    ref = make_encoder(config, 11)
    tp_enc = tensor_parallel_hstu(make_encoder(config, 11), ctx)
    ref_opt, tp_opt = make_opt(ref.parameters()), make_opt(tp_enc.parameters())
    for step in range(steps):
        inp = encoder_inputs([5, 3, 8], config.embedding_dim, 1000 * step + ctx.dp_rank)
        for enc, opt in ((ref, ref_opt), (tp_enc, tp_opt)):
            opt.zero_grad()
            run_encoder(enc, inp)
            opt.step()
    full = full_dense_state_dict(tp_enc, ctx)
    expected = ref.state_dict()
    assert sorted(full) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(full[name], value, **TOL, msg=lambda m, n=name: f"{optimizer} {n}: {m}")


def check_state_dict_round_trip(ctx, config) -> None:
    """Gathered state loads into a single-device encoder (same names and shapes) and back into another TP encoder,
    which then computes what the first one does; wrong names or shapes are clear errors."""
    from gr_parallel.tensor_parallel import full_dense_state_dict, load_full_dense_state_dict, tensor_parallel_hstu

    src = tensor_parallel_hstu(make_encoder(config, 21), ctx)
    full = full_dense_state_dict(src, ctx)
    single = make_encoder(config, 22)
    single.load_state_dict(full)  # strict: exactly the single-device names and shapes
    dst = tensor_parallel_hstu(make_encoder(config, 23), ctx)
    load_full_dense_state_dict(dst, full, ctx)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        if not name.endswith("_extra_state"):
            assert torch.equal(a, b), name
    again = full_dense_state_dict(dst, ctx)
    assert all(torch.equal(again[k], v) for k, v in full.items())
    inp = encoder_inputs([4, 7], config.embedding_dim, 5)
    torch.testing.assert_close(run_encoder(dst, inp)[0], run_encoder(single, inp)[0], **TOL)

    bad = dict(full)
    bad["blocks.0.uvqk.weight"] = bad["blocks.0.uvqk.weight"][:-1]
    with pytest.raises(ValueError, match="expected size"):
        load_full_dense_state_dict(dst, bad, ctx)
    bad = dict(full)
    bad["blocks.0.output.bias"] = torch.zeros(config.embedding_dim + 1, device=ctx.device)
    with pytest.raises(ValueError, match="does not fit"):
        load_full_dense_state_dict(dst, bad, ctx)
    bad = dict(full)
    del bad["blocks.0.input_norm.weight"]
    bad["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['blocks.0.input_norm.weight'\].*unexpected \['blocks.0.extra'\]"):
        load_full_dense_state_dict(dst, bad, ctx)


def check_sharded_dropout(ctx) -> None:
    """TP ranks drop different columns (independent masks), reproducibly from the global seed."""
    from gr_parallel.tensor_parallel import tensor_parallel_hstu

    config = encoder_config(heads=2 * ctx.tp_size, qk=2, v=4, dim=8, blocks=1, use_rab=False, dropout=0.5)
    block = tensor_parallel_hstu(make_encoder(config, 3), ctx).blocks[0]
    y = torch.ones(64, block.local_heads * 4, device=ctx.device)
    torch.manual_seed(5)
    a = block._sharded_dropout(y)
    torch.manual_seed(5)
    assert torch.equal(block._sharded_dropout(y), a)
    assert set(a.unique().tolist()) <= {0.0, 2.0} and 0.3 < (a == 0).float().mean() < 0.7
    masks = [torch.empty_like(a) for _ in range(ctx.tp_size)]
    dist.all_gather(masks, a, group=ctx.tp_group)
    assert all(not torch.equal(masks[0], m) for m in masks[1:])
    block.eval()
    assert torch.equal(block._sharded_dropout(y), y)


def check_incremental(ctx) -> None:
    """The inference path (new rows attending to cached K/V, ``forward_with_past``) of a TP block: block outputs
    equal the single-device block's, and the returned K/V are this rank's heads of the single-device ones."""
    from gr_parallel.tensor_parallel import tensor_parallel_hstu

    config = encoder_config(heads=2 * ctx.tp_size, qk=3, v=2, dim=8, blocks=1, use_rab=False)
    ref = make_encoder(config, 31).blocks[0]
    block = tensor_parallel_hstu(make_encoder(config, 31), ctx).blocks[0]
    g = torch.Generator().manual_seed(32)
    dev = ctx.device
    past_offsets, q_offsets = torch.tensor([0, 3, 5], device=dev), torch.tensor([0, 1, 3], device=dev)
    x_past, x_new = torch.randn(5, 8, generator=g).to(dev), torch.randn(3, 8, generator=g).to(dev)
    rab = (torch.randn(2, 1, 5, 5, generator=g) * 0.1).to(dev)
    heads = slice(ctx.tp_rank * block.local_heads, (ctx.tp_rank + 1) * block.local_heads)
    with torch.no_grad():
        _, ref_pv, _, ref_pk = ref.project(x_past)
        _, pv, _, pk = block.project(x_past)
        torch.testing.assert_close(pk, ref_pk[:, heads], **TOL)
        ref_y, ref_k, ref_v = ref.forward_with_past(x_new, q_offsets, ref_pk, ref_pv, past_offsets, 5, rab)
        y, k, v = block.forward_with_past(x_new, q_offsets, pk, pv, past_offsets, 5, rab)
    torch.testing.assert_close(y, ref_y, **TOL)
    torch.testing.assert_close(k, ref_k[:, heads], **TOL)
    torch.testing.assert_close(v, ref_v[:, heads], **TOL)


def check_autocast(ctx) -> None:
    """Under bf16 autocast (what ``ParallelizeConfig.bf16`` turns on) the TP encoder runs forward and backward and
    stays within bf16 rounding of the single-device encoder under the same autocast; parameters and their gradients
    stay fp32."""
    from gr_parallel.tensor_parallel import full_dense_grads, tensor_parallel_hstu

    # The default attention backend: on a GPU its bf16 kernels.
    config = dataclasses.replace(encoder_config(2 * ctx.tp_size, 4, 4, 16, 2, True), attention_backend="auto")
    ref = make_encoder(config, 41)
    tp_enc = tensor_parallel_hstu(make_encoder(config, 41), ctx)
    inp = encoder_inputs([6, 3, 8], 16, 42)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        ref_out, ref_dx = run_encoder(ref, inp)
        out, dx = run_encoder(tp_enc, inp)
    bf16 = {"atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(out, ref_out, **bf16)
    torch.testing.assert_close(dx, ref_dx, **bf16)
    grads = full_dense_grads(tp_enc, ctx)
    for name, p in ref.named_parameters():
        assert grads[name].dtype == torch.float32, name
        scale = float(p.grad.abs().max()) + 1e-3
        torch.testing.assert_close(grads[name] / scale, p.grad / scale, **bf16, msg=lambda m, n=name: f"{n}: {m}")
    check_replicated_grads_identical(tp_enc, ctx)


def check_conversion_errors(ctx) -> None:
    from gr_parallel.tensor_parallel import tensor_parallel_hstu

    odd = encoder_config(heads=ctx.tp_size + 1, qk=2, v=2, dim=4, blocks=1, use_rab=False)
    with pytest.raises(ValueError, match=f"num_heads {ctx.tp_size + 1} is not divisible by the tensor-parallel"):
        tensor_parallel_hstu(make_encoder(odd, 0), ctx)
    enc = tensor_parallel_hstu(make_encoder(encoder_config(ctx.tp_size, 2, 2, 4, 1, True), 0), ctx)
    with pytest.raises(ValueError, match="already tensor-parallel"):
        tensor_parallel_hstu(enc, ctx)
    with pytest.raises(TypeError, match="converts an HSTUEncoder"):
        tensor_parallel_hstu(enc.blocks[0], ctx)


def worker_tensor_parallel(
    rank: int, world: int, tmp: Path, tp: int, examples: int, tp_only_checks: bool, attention: str = "auto"
) -> None:
    """Parity of the TP encoder with the single-device one over hypothesis-drawn shapes (every rank draws the same
    examples: derandomised; a failure is then the same on every rank, so no rank waits in a collective), training,
    state-dict round trip, dropout, the inference path, bf16 autocast and errors."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ctx = gr_parallel.initialize(tp=tp, timeout_s=120.0)
    SETUP.update(device=ctx.device, attention=attention)

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None)
    @given(
        heads_per_rank=st.integers(1, 2),
        qk=st.integers(1, 4),
        v=st.integers(1, 4),
        dim=st.integers(2, 8),
        blocks=st.integers(1, 2),
        use_rab=st.booleans(),
        causal=st.booleans(),
        targets=st.booleans(),
        lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3),
        seed=st.integers(0, 2**16),
    )
    def parity(heads_per_rank, qk, v, dim, blocks, use_rab, causal, targets, lengths, seed) -> None:
        config = encoder_config(heads_per_rank * tp, qk, v, dim, blocks, use_rab, causal)
        check_parity(ctx, config, lengths, seed, targets)

    # The shapes first (rab on and off), then drawn ones.
    for use_rab in (True, False):
        check_parity(ctx, encoder_config(2 * tp, 4, 4, 16, 2, use_rab), [5, 8, 1, 6], 7)
    parity()
    check_fused_norms(ctx)
    for optimizer in ("sgd", "adamw"):
        check_training(ctx, encoder_config(2 * tp, 3, 5, 12, 2, True), optimizer)
    check_state_dict_round_trip(ctx, encoder_config(2 * tp, 3, 2, 10, 2, True))
    if tp_only_checks:  # properties of one TP group: once is enough (the 4-rank run skips them to save time)
        check_sharded_dropout(ctx)
        check_incremental(ctx)
        check_autocast(ctx)
        check_conversion_errors(ctx)
    gr_parallel.destroy()
