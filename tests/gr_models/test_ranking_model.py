"""HSTU ranking and DLRM baseline: target-mask semantics, action modes, shapes and errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gr_models.data.ranking import RankingBatch
from gr_models.modules.hstu import HSTUConfig
from gr_models.ranking import (
    DLRMConfig,
    DLRMRankingModel,
    HSTURankingConfig,
    HSTURankingModel,
    MultiTaskLoss,
    RankingFeatureSpec,
    RankingTask,
    pairwise_dots,
)

SPEC = RankingFeatureSpec(
    num_items=40,
    num_actions=5,
    user_feature_names=("user_id", "age"),
    user_feature_sizes=(10, 3),
    item_bag_name="genre",
    item_bag_size=6,
)
TASKS = [RankingTask("like", "binary", 1.0), RankingTask("rating", "regression", 0.5)]


def make_batch(hist: list[int], cands: list[int], seed: int = 0) -> RankingBatch:
    """Random windows with the given history / candidate counts."""
    g = np.random.default_rng(seed)
    h, t = sum(hist), sum(cands)

    def bags(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = g.integers(0, 3, n)
        return torch.as_tensor(g.integers(0, 6, int(lengths.sum()))), torch.as_tensor(lengths)

    hb, hl = bags(h)
    cb, cl = bags(t)
    hist_t = np.concatenate([np.sort(g.integers(0, 10_000, n)) for n in hist]) if h else np.zeros(0, np.int64)
    return RankingBatch(
        users=torch.arange(len(hist)),
        user_features=torch.as_tensor(np.stack([g.integers(0, 10, len(hist)), g.integers(0, 3, len(hist))], 1)),
        history_lengths=torch.as_tensor(hist),
        history_items=torch.as_tensor(g.integers(0, 40, h)),
        history_actions=torch.as_tensor(g.integers(0, 5, h)),
        history_timestamps=torch.as_tensor(hist_t, dtype=torch.int64),
        history_bag_values=hb,
        history_bag_lengths=hl,
        candidate_lengths=torch.as_tensor(cands),
        candidate_items=torch.as_tensor(g.integers(0, 40, t)),
        candidate_timestamps=torch.as_tensor(g.integers(10_000, 20_000, t)),
        candidate_bag_values=cb,
        candidate_bag_lengths=cl,
        request_timestamps=torch.full((len(hist),), 10_000),
        labels={"like": torch.as_tensor(g.integers(0, 2, t)).float(), "rating": torch.as_tensor(g.random(t) * 5)},
    )


def select_candidates(batch: RankingBatch, keep: list[list[int]]) -> RankingBatch:
    """The same windows with candidate subsets/permutations ``keep[b]`` (indices within window b)."""
    starts = torch.cumsum(batch.candidate_lengths, 0) - batch.candidate_lengths
    rows = torch.as_tensor([int(starts[b]) + i for b, ks in enumerate(keep) for i in ks], dtype=torch.int64)
    bag_starts = torch.cumsum(batch.candidate_bag_lengths, 0) - batch.candidate_bag_lengths
    bag_rows = [torch.arange(int(bag_starts[r]), int(bag_starts[r] + batch.candidate_bag_lengths[r])) for r in rows]
    return dataclasses.replace(
        batch,
        candidate_lengths=torch.as_tensor([len(k) for k in keep]),
        candidate_items=batch.candidate_items[rows],
        candidate_timestamps=batch.candidate_timestamps[rows],
        candidate_bag_values=batch.candidate_bag_values[torch.cat(bag_rows)] if rows.numel() else torch.zeros(0),
        candidate_bag_lengths=batch.candidate_bag_lengths[rows],
        labels={k: v[rows] for k, v in batch.labels.items()},
    ), rows


def hstu(mode: str, **kw: object) -> HSTURankingModel:
    torch.manual_seed(0)
    cfg = HSTURankingConfig(SPEC, TASKS, action_mode=mode, embedding_dim=16, max_seq_len=64, **kw)  # type: ignore[arg-type]
    return HSTURankingModel(cfg).eval()


@pytest.mark.parametrize("mode", ["add", "interleave"])
def test_candidate_output_ignores_other_candidates(mode: str) -> None:
    model = hstu(mode)
    batch = make_batch([5, 0, 12], [4, 3, 6])
    with torch.no_grad():
        full = model(batch)
        for keep in ([[3, 1, 0, 2], [2, 0, 1], [5, 4, 3, 2, 1, 0]], [[2], [1, 0], [0, 4]], [[0, 1, 2, 3], [], [3]]):
            sub, rows = select_candidates(batch, keep)
            torch.testing.assert_close(model(sub), full[rows], rtol=1e-5, atol=1e-6)


def test_without_the_target_mask_candidates_would_interact() -> None:
    """Control: the same encoder call without num_targets lets candidates see each other, so outputs change."""
    model = hstu("add")
    batch = make_batch([6], [5])
    enc = model.encoder
    calls: list[torch.Tensor] = []
    original = enc.forward

    def no_targets(*args: object, **kwargs: object) -> torch.Tensor:
        kwargs["num_targets"] = None
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    with torch.no_grad():
        masked = model(batch)
        enc.forward = no_targets  # type: ignore[method-assign]
        unmasked = model(batch)
    assert calls and not torch.allclose(masked[1:], unmasked[1:], atol=1e-6)


@pytest.mark.parametrize("mode", ["add", "interleave"])
def test_history_actions_change_the_scores(mode: str) -> None:
    model = hstu(mode)
    batch = make_batch([8, 5], [3, 3])
    other = dataclasses.replace(batch, history_actions=(batch.history_actions + 1) % 5)
    with torch.no_grad():
        assert not torch.allclose(model(batch), model(other))
        # With a zero action table, "add" ignores actions; "interleave" still has action tokens (at zero input).
        model.action_embedding.weight.zero_()
        same = torch.allclose(model(batch), model(other))
    assert same


def test_interleave_uses_two_tokens_per_event() -> None:
    batch = make_batch([20], [4])
    # 2 user features + 20 events + 4 candidates = 26 tokens fit in 30; interleaved (46) do not.
    cfg = {"embedding_dim": 16, "max_seq_len": 30}
    HSTURankingModel(HSTURankingConfig(SPEC, TASKS, action_mode="add", **cfg)).eval()(batch)  # type: ignore[arg-type]
    inter = HSTURankingModel(HSTURankingConfig(SPEC, TASKS, action_mode="interleave", **cfg)).eval()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs 46 tokens"):
        inter(batch)
    with torch.no_grad():
        assert not torch.allclose(hstu("add")(batch), hstu("interleave")(batch))


def test_interleaved_item_token_does_not_see_its_own_action() -> None:
    """Causality inside the history (one block: the contextual prefix sees the whole history, so deeper blocks
    would carry the action to every row through it): only the last event's action changes -> the tokens up to
    that event's item token are unchanged; its action token and the candidates change."""
    model = hstu("interleave", hstu=HSTUConfig(num_blocks=1))
    batch = make_batch([6], [2])
    other = batch.history_actions.clone()
    other[-1] = (other[-1] + 2) % 5
    seen: list[torch.Tensor] = []
    original = model.encoder.forward

    def capture(*args: object, **kwargs: object) -> torch.Tensor:
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    model.encoder.forward = capture  # type: ignore[method-assign]
    with torch.no_grad():
        a = model(batch)
        b = model(dataclasses.replace(batch, history_actions=other))
    ctx, last_item = 2, 2 + 2 * 5  # token rows: 2 user features, then item/action pairs
    torch.testing.assert_close(seen[0][ctx : last_item + 1], seen[1][ctx : last_item + 1])
    assert not torch.allclose(seen[0][:ctx], seen[1][:ctx])  # the prefix sees the whole history
    assert not torch.allclose(seen[0][last_item + 1], seen[1][last_item + 1])
    assert not torch.allclose(a, b)
    assert ctx == SPEC.num_user_features


def test_bad_configs_are_named() -> None:
    with pytest.raises(ValueError, match="action_mode"):
        HSTURankingConfig(SPEC, TASKS, action_mode="concat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        HSTURankingConfig(SPEC, [RankingTask("like"), RankingTask("like")])
    with pytest.raises(ValueError, match="kind"):
        RankingTask("x", "ranking")  # type: ignore[arg-type]
    model = hstu("add")
    batch = make_batch([3], [2])
    with pytest.raises(ValueError, match="user_features has 1 columns"):
        model(dataclasses.replace(batch, user_features=batch.user_features[:, :1]))


def test_pairwise_dots_matches_loops() -> None:
    v = torch.randn(3, 4, 5)
    want = torch.stack([torch.stack([v[n, i] @ v[n, j] for i in range(4) for j in range(i + 1, 4)]) for n in range(3)])
    torch.testing.assert_close(pairwise_dots(v), want)


def test_dlrm_scores_each_candidate_independently() -> None:
    torch.manual_seed(0)
    model = DLRMRankingModel(DLRMConfig(SPEC, TASKS, embedding_dim=8, hidden_dims=(16, 8))).eval()
    batch = make_batch([3, 4], [3, 2])
    with torch.no_grad():
        full = model(batch)
        sub, rows = select_candidates(batch, [[2, 0], [1]])
        torch.testing.assert_close(model(sub), full[rows])
    assert full.shape == (5, 2)


def test_multitask_loss_is_the_weighted_sum() -> None:
    preds = torch.tensor([[0.3, 2.0], [-1.0, 4.5]])
    labels = {"like": torch.tensor([1.0, 0.0]), "rating": torch.tensor([3.0, 4.0])}
    total, parts = MultiTaskLoss(TASKS)(preds, labels)
    bce = -(np.log(1 / (1 + np.exp(-0.3))) + np.log(1 - 1 / (1 + np.exp(1.0)))) / 2
    mse = ((2.0 - 3.0) ** 2 + (4.5 - 4.0) ** 2) / 2
    assert float(parts["like"]) == pytest.approx(bce, rel=1e-6)
    assert float(parts["rating"]) == pytest.approx(mse, rel=1e-6)
    assert float(total) == pytest.approx(bce + 0.5 * mse, rel=1e-6)


def test_relative_bias_with_explicit_token_positions() -> None:
    """positions = each token's index reproduces the default bias; shared positions give equal position terms."""
    from gr_models.jagged import lengths_to_offsets, positions_in_sequence
    from gr_models.modules.relative_bias import RelativeBucketedTimeAndPositionBias

    torch.manual_seed(0)
    rab = RelativeBucketedTimeAndPositionBias(max_seq_len=8, num_time_buckets=16)
    offsets = lengths_to_offsets(torch.tensor([5, 3]))
    ts = torch.randint(0, 10_000, (8,))
    qts = ts + 100
    default = rab(ts, qts, offsets, 6)
    index = positions_in_sequence(offsets, 8)
    explicit = rab(ts, qts, offsets, 6, index)
    for b, n in enumerate((5, 3)):  # padding rows/columns are never read by the attention
        torch.testing.assert_close(explicit[b, :, :n, :n], default[b, :, :n, :n])
    same_time = torch.zeros(8, dtype=torch.int64)
    shared = rab(same_time, same_time, offsets, 6, torch.tensor([0, 1, 2, 2, 2, 0, 1, 1]))
    # Tokens 2, 3, 4 of sequence 0 share a position: identical rows and columns among them.
    torch.testing.assert_close(shared[0, 0, 2, :5], shared[0, 0, 4, :5])
    torch.testing.assert_close(shared[0, 0, :5, 3], shared[0, 0, :5, 4])
