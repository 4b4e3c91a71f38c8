"""RetrievalModel.training_forward: one table lookup for the inputs, the targets (and pre-drawn uniform negatives)
equals the forward that looks each up separately (values, loss and every gradient), and a fused-optimizer (gr-dynemb)
table takes exactly one step per training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import KeyedJaggedTensor

from gr_models.data.batching import ITEM_FEATURE, SequenceBatch
from gr_models.modules.hstu import HSTUConfig
from gr_models.modules.input_embedding import DynamicItemTableConfig
from gr_models.retrieval.losses import SampledSoftmaxLoss
from gr_models.retrieval.model import RetrievalModel, RetrievalModelConfig

NUM_ITEMS, DIM, MAX_LEN, TABLE_LR = 40, 8, 10, 0.05


def config(item_table: str = "static") -> RetrievalModelConfig:
    return RetrievalModelConfig(
        num_items=NUM_ITEMS,
        embedding_dim=DIM,
        max_seq_len=MAX_LEN,
        dropout=0.0,
        hstu=HSTUConfig(num_blocks=1, num_heads=2, num_time_buckets=8, attention_backend="reference"),
        item_table=item_table,  # type: ignore[arg-type]
        dynamic_item_table=DynamicItemTableConfig(capacity=128, optimizer="adam", lr=TABLE_LR, seed=5),
    )


def make_batch(lengths: list[int], seed: int) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    total = int(lengths_t.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths_t.cumsum(0)])
    ts = torch.arange(total, dtype=torch.int64) * 7 + 1_600_000_000
    return SequenceBatch(
        user_ids=torch.arange(len(lengths)),
        features=KeyedJaggedTensor.from_lengths_sync(
            keys=[ITEM_FEATURE], values=torch.randint(NUM_ITEMS, (total,), generator=g), lengths=lengths_t
        ),
        timestamps=ts,
        seq_offsets=offsets,
        max_seq_len=max(lengths),
        target_items=torch.randint(NUM_ITEMS, (total,), generator=g),
        target_timestamps=ts + 3,
    )


def lookup_path_loss(model: RetrievalModel, batch: SequenceBatch, loss_fn: SampledSoftmaxLoss) -> torch.Tensor:
    """Three lookups: inputs (model forward), targets, and the drawn negative ids."""
    q = model(batch)
    targets = batch.target_items
    negatives = loss_fn.sample_negatives(targets)
    pos = (q * model.item_embeddings(targets)).sum(-1, keepdim=True)
    neg = torch.einsum("nd,nkd->nk", q, model.item_embeddings(negatives))
    neg = neg.masked_fill(negatives == targets.unsqueeze(1), float("-inf"))
    return F.cross_entropy(torch.cat([pos, neg], 1) / loss_fn.temperature, torch.zeros_like(targets))


def one_lookup_loss(model: RetrievalModel, batch: SequenceBatch, loss_fn: SampledSoftmaxLoss) -> torch.Tensor:
    """In-batch negatives: gathered from the targets' rows. Uniform ones: drawn first, looked up with the rest."""
    if loss_fn.negatives == "in_batch":
        queries, target_emb, _ = model.training_forward(batch)
        return loss_fn(queries, batch.target_items, target_embeddings=target_emb)
    negatives = loss_fn.sample_negatives(batch.target_items)
    emb = model.training_forward(batch, negatives=negatives)
    return loss_fn(
        emb.queries,
        batch.target_items,
        target_embeddings=emb.targets,
        negatives=negatives,
        negative_embeddings=emb.negatives,
    )


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(1, MAX_LEN), min_size=1, max_size=5),
    negatives=st.sampled_from(["in_batch", "uniform"]),
    seed=st.integers(0, 1000),
)
def test_one_lookup_equals_separate_lookups(lengths: list[int], negatives: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = RetrievalModel(config())
    batch = make_batch(lengths, seed)
    negative_ids = torch.randint(NUM_ITEMS, (batch.target_items.numel(), 3))
    emb = model.training_forward(batch, negatives=negative_ids)
    torch.testing.assert_close(emb.queries, model(batch), rtol=0, atol=0)
    torch.testing.assert_close(emb.targets, model.item_embeddings(batch.target_items), rtol=0, atol=0)
    torch.testing.assert_close(emb.negatives, model.item_embeddings(negative_ids), rtol=0, atol=0)
    assert model.training_forward(batch).negatives is None

    # NUM_ITEMS > K * D: the lookup path's uniform negatives take the [N, K, D] gather, as the one-lookup path does.
    loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=4, temperature=0.1, negatives=negatives)  # type: ignore[arg-type]
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed + 1)
    want = lookup_path_loss(model, batch, loss_fn)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    torch.manual_seed(seed + 1)  # the same negatives
    got = one_lookup_loss(model, batch, loss_fn)
    got_grads = torch.autograd.grad(got, params, allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Gradients within fp32 rounding: the two paths sum the same terms in another order (a target row's gradient
    # through one normalize here, through two there), scaled by 1 / temperature.
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads, strict=True):
        if w is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("negatives", ["in_batch", "uniform"])
def test_under_autocast_the_embeddings_come_in_its_dtype(negatives: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under (CPU) bf16 autocast, ``training_forward`` normalises straight into bf16 (what the loss's gather and
    matmuls read): the values are the fp32 normalised embeddings rounded, the loss and the fp32 parameters' gradients
    within bf16 rounding of the run that normalises into fp32 (and casts inside the loss)."""
    from gr_models.retrieval import model as model_module

    torch.manual_seed(0)
    model = RetrievalModel(config())
    batch = make_batch([6, 3, 9], 1)
    loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=4, temperature=0.1, negatives=negatives)  # type: ignore[arg-type]
    negative_ids = loss_fn.sample_negatives(batch.target_items) if negatives == "uniform" else None
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for out_dtype in (torch.bfloat16, None):
        if out_dtype is None:  # fp32 embeddings from the same autocast encoder
            monkeypatch.setattr(model_module, "compute_dtype", lambda t, *dtypes: t.dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = model.training_forward(batch, negatives=negative_ids)
            torch.manual_seed(1)
            loss = loss_fn(
                emb.queries, batch.target_items, target_embeddings=emb.targets, negatives=negative_ids,
                negative_embeddings=emb.negatives,
            )  # fmt: skip
        assert emb.queries.dtype == emb.targets.dtype == (out_dtype or torch.float32)
        results.append((emb, loss, torch.autograd.grad(loss, params, allow_unused=True)))
    (emb, loss, grads), (emb32, loss32, grads32) = results
    for got, want in zip(emb, emb32, strict=True):
        if want is not None:
            torch.testing.assert_close(got.float(), want.detach(), rtol=2**-8, atol=1e-7)  # half a bf16 ulp
    torch.testing.assert_close(loss, loss32, rtol=2e-2, atol=2e-2)
    for g, w in zip(grads, grads32, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-2 * w.abs().max().item())


def test_one_lookup_features_and_errors() -> None:
    model = RetrievalModel(config())
    batch = make_batch([3, 2], 0)
    kjt = model.training_features(batch)
    assert kjt.keys() == [ITEM_FEATURE]
    # One entry per id (inputs, then targets): FBGEMM's unpooled lookup walks an entry's ids with one warp
    assert kjt.lengths().tolist() == [1] * 10
    assert kjt.values().tolist() == batch.features.values().tolist() + batch.target_items.tolist()
    other = model.training_features(make_batch([2, 3], 0))
    with pytest.raises(ValueError, match="hold 10 ids in 10 entries, not the batch's 4 inputs plus 4 ids"):
        model.training_forward(make_batch([1, 3], 0), other)
    two_keys = KeyedJaggedTensor.from_lengths_sync(["item", "x"], torch.arange(4), torch.tensor([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="exactly the item feature"):
        model.input_embedding.with_ids(two_keys, torch.arange(2))
    with pytest.raises(ValueError, match=r"negatives must be \[5, K\]"):
        model.training_features(batch, torch.zeros(4, 2, dtype=torch.int64))


def _dynamic_table(model: RetrievalModel):
    return model.input_embedding.item_embeddings.table("item_table")


@pytest.mark.parametrize("negatives", ["in_batch", "uniform"])
def test_dynamic_table_takes_one_optimizer_step_per_training_step(negatives: str) -> None:
    pytest.importorskip("gr_dynemb")
    batch = make_batch([4, 6, 2], 11)
    ids = torch.arange(NUM_ITEMS)  # every row the step may touch (uniform negatives reach any)
    loss_fn = SampledSoftmaxLoss(NUM_ITEMS, num_negatives=5, temperature=0.1, negatives=negatives)  # type: ignore[arg-type]

    torch.manual_seed(0)
    dyn = RetrievalModel(config("dynamic"))
    dyn.eval()
    rows0 = dyn.input_embedding.embed_ids(ids)  # evaluation: initializer rows, nothing inserted
    dyn.train()

    # Reference: a static twin with the same rows and dense parameters gives the step's summed row gradients.
    static = RetrievalModel(config("static"))
    dense = {k: v for k, v in dyn.state_dict().items() if not k.startswith("input_embedding.item_embeddings")}
    static.load_state_dict(dense, strict=False)
    weight = static.input_embedding.item_embeddings.embeddings["item_table"].weight
    with torch.no_grad():
        weight[ids] = rows0
    torch.manual_seed(7)
    one_lookup_loss(static, batch, loss_fn).backward()
    g = weight.grad[ids]

    torch.manual_seed(7)
    one_lookup_loss(dyn, batch, loss_fn).backward()
    assert _dynamic_table(dyn).step == 1
    dyn.eval()
    rows1 = dyn.input_embedding.embed_ids(ids)
    # One Adam step from zero state with the summed gradient (bias-corrected m = g, v = g^2).
    torch.testing.assert_close(rows1, rows0 - TABLE_LR * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-6)

    # The forward that looks each up separately steps the table once per lookup (what training_forward avoids).
    torch.manual_seed(0)
    separate = RetrievalModel(config("dynamic"))
    torch.manual_seed(7)
    loss_fn(separate(batch), batch.target_items, separate.item_embeddings).backward()
    assert _dynamic_table(separate).step == (2 if negatives == "in_batch" else 3)


@pytest.mark.parametrize("checked", [False, True])
def test_offsets_checked_on_the_host_skip_the_device_check(checked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose offsets were built on the host (``offsets_checked``, as ``collate_sequences`` sets it and
    ``.to()`` keeps it) skips the attention op's value check, a sync per forward on a GPU; others still run it, and a
    bad unchecked batch still gets the op's error."""
    import dataclasses
    import importlib

    attention = importlib.import_module("gr_kernels.hstu_attention")  # the module (the package exports the function)
    calls = []
    check = attention.check_attention_values
    monkeypatch.setattr(attention, "check_attention_values", lambda *a: calls.append(1) or check(*a))
    torch.manual_seed(0)
    model = RetrievalModel(config())
    batch = dataclasses.replace(make_batch([3, 10], 0), offsets_checked=checked).to("cpu")
    assert batch.offsets_checked is checked
    model.training_forward(batch)
    assert len(calls) == (0 if checked else 1)
    # Sequence 1 has 10 tokens; the encoder rounds max_seq_len up to 8 for its bias.
    bad = dataclasses.replace(batch, max_seq_len=4, offsets_checked=False)
    with pytest.raises(ValueError, match="length 10 > max_seq_len=8"):
        model(bad)


def test_collate_marks_its_offsets_checked() -> None:
    import numpy as np

    from gr_models.data.batching import SequenceExample, collate_sequences

    ex = [
        SequenceExample(0, np.arange(3), np.arange(3), np.arange(1, 4), np.arange(1, 4), None),
        SequenceExample(1, np.arange(2), np.arange(2), np.arange(1, 3), np.arange(1, 3), None),
    ]
    batch = collate_sequences(ex)
    assert batch.offsets_checked and batch.seq_offsets.tolist() == [0, 3, 5] and batch.max_seq_len == 3
    assert batch.to("cpu").offsets_checked
