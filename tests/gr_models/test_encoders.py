"""HSTU and SASRec encoders on jagged input: batch-composition invariance, causality, config errors."""

from __future__ import annotations

import pytest
import torch

from gr_models.modules import HSTUConfig, HSTUEncoder, SASRecConfig, SASRecEncoder
from gr_models.modules.relative_bias import aligned_bias_len
from gr_models.retrieval import RetrievalModelConfig


def _encoder(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "hstu":
        return HSTUEncoder(HSTUConfig(embedding_dim=8, num_heads=2, max_seq_len=6, dropout=0.0)).eval()
    return SASRecEncoder(SASRecConfig(embedding_dim=8, num_heads=2, max_seq_len=6, dropout=0.0)).eval()


def _run(enc, xs: list[torch.Tensor], ts: list[torch.Tensor]) -> list[torch.Tensor]:
    lengths = [len(x) for x in xs]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    t = torch.cat(ts)
    out = enc(torch.cat(xs), offsets, max(lengths), t, t + 10)
    return list(out.split(lengths))


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_sequence_output_independent_of_batch(kind: str) -> None:
    enc = _encoder(kind)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 8, generator=g) for n in (4, 1, 6)]
    ts = [torch.arange(n) * 100 for n in (4, 1, 6)]
    together = _run(enc, xs, ts)
    for x, t, y in zip(xs, ts, together, strict=True):
        torch.testing.assert_close(_run(enc, [x], [t])[0], y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_causal_future_does_not_leak(kind: str) -> None:
    enc = _encoder(kind)
    x = torch.randn(5, 8)
    t = torch.arange(5) * 100
    a = _run(enc, [x], [t])[0]
    x2 = x.clone()
    x2[3:] = torch.randn(2, 8)
    b = _run(enc, [x2], [t])[0]
    torch.testing.assert_close(a[:3], b[:3])
    assert not torch.allclose(a[3:], b[3:])


def test_config_errors_and_dims_follow_embedding_dim() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        HSTUConfig(embedding_dim=10, num_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        SASRecConfig(dropout=1.5)
    cfg = RetrievalModelConfig(num_items=10, embedding_dim=16, max_seq_len=8)
    assert (cfg.hstu.qk_dim, cfg.hstu.v_dim, cfg.hstu.max_seq_len) == (16, 16, 8)
    assert cfg.hstu.qk_scale == pytest.approx(0.25)
    with pytest.raises(ValueError, match="encoder"):
        RetrievalModelConfig(num_items=10, encoder="gru")  # type: ignore[arg-type]


def test_hstu_encoder_checks_offsets_once_per_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The op's value checks (a host sync on a GPU) run in the first block only; bad offsets still raise."""
    import gr_kernels

    enc = HSTUEncoder(HSTUConfig(embedding_dim=8, num_heads=2, num_blocks=3, max_seq_len=6, dropout=0.0)).eval()
    seen = []
    real = gr_kernels.hstu_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["validate"])
        return real(*args, **kwargs)

    monkeypatch.setattr(gr_kernels, "hstu_attention", spy)
    t = torch.arange(5) * 10
    enc(torch.randn(5, 8), torch.tensor([0, 2, 5]), 3, t, t + 1)
    assert seen == [True, False, False]
    with pytest.raises(ValueError, match="seq_offsets"):
        enc(torch.randn(5, 8), torch.tensor([0, 4, 2]), 3, t, t + 1)  # decreasing offsets


def _index_dtypes_seen(monkeypatch: pytest.MonkeyPatch, device: str, offsets_dtype: torch.dtype):
    """(the output, and the dtypes of the offsets and target counts each block's attention op got) of a 3-block
    encoder on ``device`` with offsets and targets of ``offsets_dtype``."""
    import gr_kernels

    torch.manual_seed(0)
    enc = HSTUEncoder(HSTUConfig(embedding_dim=8, num_heads=2, num_blocks=3, max_seq_len=6, dropout=0.0))
    enc = enc.eval().to(device)
    seen = []
    real = gr_kernels.hstu_attention

    def spy(q, k, v, seq_offsets, *args, **kwargs):
        seen.append((seq_offsets.dtype, kwargs["num_targets"].dtype))
        return real(q, k, v, seq_offsets, *args, **kwargs)

    monkeypatch.setattr(gr_kernels, "hstu_attention", spy)
    t = torch.arange(5, device=device) * 10
    offsets = torch.tensor([0, 2, 5], dtype=offsets_dtype, device=device)
    targets = torch.tensor([1, 2], dtype=offsets_dtype, device=device)
    with torch.no_grad():
        y = enc(torch.randn(5, 8, device=device), offsets, 3, t, t + 1, num_targets=targets)
    return y, seen


def test_hstu_encoder_passes_cpu_offsets_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the blocks get the caller's offsets and targets (the PyTorch reference indexes with int64)."""
    from gr_models.modules.hstu import kernel_index

    _, seen = _index_dtypes_seen(monkeypatch, "cpu", torch.int64)
    assert seen == [(torch.int64, torch.int64)] * 3
    assert kernel_index(None, torch.zeros(2, 8)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hstu_encoder_converts_cuda_offsets_to_int32_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA every block's attention gets int32 offsets and targets (what its kernels read), converted once per
    pass, and the output equals the one from int32 offsets given by the caller."""
    y64, seen = _index_dtypes_seen(monkeypatch, "cuda", torch.int64)
    assert seen == [(torch.int32, torch.int32)] * 3
    y32, _ = _index_dtypes_seen(monkeypatch, "cuda", torch.int32)
    torch.testing.assert_close(y64, y32, rtol=0, atol=0)


def test_aligned_bias_len_rounds_up_within_the_bias_table() -> None:
    assert [aligned_bias_len(n, 200) for n in (1, 8, 13, 199, 200)] == [8, 8, 16, 200, 200]
    assert [aligned_bias_len(n, 203) for n in (201, 203)] == [203, 203]  # capped by the table, never below n


def test_hstu_encoder_pads_the_bias_side_without_changing_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a relative bias, the op gets max_seq_len rounded up to 8 (16-byte bias rows, TMA on Hopper); the
    outputs equal the blocks run on the batch's own max_seq_len."""
    import gr_kernels

    torch.manual_seed(0)
    enc = HSTUEncoder(HSTUConfig(embedding_dim=8, num_heads=2, num_blocks=2, max_seq_len=40, dropout=0.0)).eval()
    x, offsets, t = torch.randn(13, 8), torch.tensor([0, 3, 13]), torch.arange(13) * 7
    sides = []
    real = gr_kernels.hstu_attention

    def spy(*args, **kwargs):
        sides.append((args[4], kwargs["rab"].shape[-1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(gr_kernels, "hstu_attention", spy)
    got = enc(x, offsets, 10, t, t + 1)
    assert sides == [(16, 16), (16, 16)]
    monkeypatch.setattr(gr_kernels, "hstu_attention", real)
    rab = enc.relative_bias(t, t + 1, offsets, 10, None)
    want = x
    for block in enc.blocks:
        want = block(want, offsets, 10, rab)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
