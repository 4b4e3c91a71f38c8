"""Export of the scoring path: the plain-op ScoringGraph equals the model (hypothesis over shapes and options), the
torch.export program equals eager for every history/candidate count (one program, dynamic dims), and the
AOTInductor package round-trips (weights and spec inside), loads without gr_models, and serves over HTTP."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_models.inference import CachedRankingScorer, Candidates, InferenceInputError, KVCache, UserEvents
from gr_models.inference.export import (
    ScoringGraph,
    ScoringSpec,
    export_scoring,
    load_scoring_package,
    save_scoring_package,
    scoring_inputs,
)
from gr_models.modules.hstu import HSTUConfig
from gr_models.ranking import HSTURankingConfig, HSTURankingModel, RankingFeatureSpec, RankingTask
from gr_models.serving import ScoringServer, backend_from_package, cached_backend

TASKS = [RankingTask("like", "binary"), RankingTask("rating", "regression")]
TOL = 1e-5


@functools.cache
def make_model(
    action_mode: str = "add", context: str = "full", bags: bool = True, use_rab: bool = True, max_attn_len: int = 0
) -> HSTURankingModel:
    torch.manual_seed(0)
    spec = RankingFeatureSpec(40, 5, ("age", "sex"), (7, 2), "genre", 6 if bags else 0)
    cfg = HSTURankingConfig(
        spec,
        TASKS,
        action_mode=action_mode,
        embedding_dim=16,
        max_seq_len=48,
        head_hidden=8,
        context_attention=context,
        hstu=HSTUConfig(num_blocks=2, num_heads=2, use_rab=use_rab, max_attn_len=max_attn_len, alpha=0.5),
    )
    model = HSTURankingModel(cfg).eval()
    with torch.no_grad():  # larger-than-init weights: every input visibly moves the scores
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def make_request(model: HSTURankingModel, h: int, m: int, seed: int) -> tuple[list[int], UserEvents, Candidates, int]:
    g = torch.Generator().manual_seed(seed)
    spec = model.config.features
    feats = [int(torch.randint(0, s, (1,), generator=g)) for s in spec.user_feature_sizes]

    def bags(n: int) -> list[list[int]] | None:
        if not spec.item_bag_size:
            return None
        sizes = torch.randint(0, 3, (n,), generator=g).tolist()
        return [torch.randint(0, spec.item_bag_size, (k,), generator=g).tolist() for k in sizes]

    times = torch.sort(torch.randint(0, 10_000, (h,), generator=g)).values.tolist()
    history = UserEvents.from_lists(
        torch.randint(0, spec.num_items, (h,), generator=g), torch.randint(0, spec.num_actions, (h,), generator=g),
        times, bags(h),
    )  # fmt: skip
    cand_times = None if seed % 2 else torch.randint(10_000, 20_000, (m,), generator=g)
    candidates = Candidates.from_lists(torch.randint(0, spec.num_items, (m,), generator=g), bags(m), cand_times)
    return feats, history, candidates, 20_000


def eager(model: HSTURankingModel, feats: list[int], history: UserEvents, cands: Candidates, t: int) -> torch.Tensor:
    """The model's own forward on the one-window batch (the uncached reference)."""
    scorer = CachedRankingScorer(model, KVCache.for_encoder(model.config.hstu, budget_bytes=1 << 20))
    return scorer.full_recompute(feats, history, cands, t)


OPTIONS = st.tuples(
    st.sampled_from(["add", "interleave"]),
    st.sampled_from(["full", "causal"]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 3]),
)


@settings(max_examples=25, deadline=None)
@given(options=OPTIONS, h=st.integers(0, 12), m=st.integers(1, 6), seed=st.integers(0, 1000))
def test_scoring_graph_equals_the_model(options: tuple, h: int, m: int, seed: int) -> None:
    model = make_model(*options)
    request = make_request(model, h, m, seed)
    with torch.no_grad():
        got = ScoringGraph(model)(*scoring_inputs(*request))
    torch.testing.assert_close(got, eager(model, *request), rtol=0, atol=TOL)


def test_scoring_graph_sees_every_input() -> None:
    """Negative control: changing any history field, a feature or the request time changes the scores."""
    model = make_model()
    feats, history, cands, t = make_request(model, 6, 3, seed=2)
    graph = ScoringGraph(model)
    with torch.no_grad():
        base = graph(*scoring_inputs(feats, history, cands, t))
        swapped = dataclasses.replace(history, items=history.items.flip(0))
        acted = dataclasses.replace(history, actions=(history.actions + 1) % 5)
        variants = [
            ([feats[0] ^ 1, feats[1]], history, t),
            (feats, swapped, t),
            (feats, acted, t),
            (feats, history, t + 10**5),
        ]
        for f, hist, when in variants:
            assert (graph(*scoring_inputs(f, hist, cands, when)) - base).abs().max() > 1e-3


@pytest.mark.parametrize(
    "options", [("add", "full", True, True, 0), ("interleave", "causal", False, False, 3)], ids=["add", "interleave"]
)
def test_exported_program_equals_eager_for_every_size(options: tuple) -> None:
    model = make_model(*options)
    program = export_scoring(model)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "gr_kernels.hstu_attention_fwd.default" in ops
    module = program.module()
    per_event = model.config.tokens_per_event
    longest = (model.config.max_seq_len - 2 - 1) // per_event
    for h, m in [(0, 1), (0, 7), (1, 1), (5, 3), (longest, 1), (3, 20)]:
        request = make_request(model, h, m, seed=h * 31 + m)
        torch.testing.assert_close(module(*scoring_inputs(*request)), eager(model, *request), rtol=0, atol=TOL)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small AOTInductor compile (g++) shared by the package tests."""
    path = tmp_path_factory.mktemp("aoti") / "scoring.pt2"
    return save_scoring_package(make_model(), path, model_version="pkg-v1")


def test_package_round_trip(package: Path) -> None:
    model = make_model()
    scorer = load_scoring_package(package)
    assert scorer.spec == ScoringSpec.of_model(model, "pkg-v1")
    assert scorer.spec.max_history_events == 45 and scorer.spec.max_candidates == 1
    for h, m in [(0, 1), (0, 5), (4, 3), (45, 1), (30, 16)]:
        request = make_request(model, h, m, seed=h + 7 * m)
        torch.testing.assert_close(scorer(*request), eager(model, *request), rtol=0, atol=TOL)
    feats, history, _, t = make_request(model, 45, 1, seed=1)
    with pytest.raises(InferenceInputError, match="needs 49 tokens"):
        scorer(feats, history, Candidates.from_lists([1, 2]), t)
    with pytest.raises(ValueError, match=r"must end in \.pt2"):
        save_scoring_package(model, package.with_suffix(".zip"), "v")


def test_package_loads_without_gr_models(package: Path, tmp_path: Path) -> None:
    """The runtime needs torch and gr_kernels (the attention op the package calls), not gr_models or examples."""
    model = make_model()
    request = make_request(model, 9, 4, seed=5)
    torch.save(scoring_inputs(*request), tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch, gr_kernels
        runner = torch._inductor.aoti_load_package({str(package)!r})
        out = runner(*torch.load({str(tmp_path / "inputs.pt")!r}))
        torch.save(out, {str(tmp_path / "out.pt")!r})
        assert not [m for m in sys.modules if m.startswith(("gr_models", "examples"))], "training code imported"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), eager(model, *request), rtol=0, atol=TOL)


def test_served_package_equals_served_cached_scorer(package: Path) -> None:
    model = make_model()
    bodies = [
        {"user_id": "p", "user_features": [2, 1], "candidates": {"items": [1, 2, 3], "bags": [[0], [], [1, 2]]},
         "events": {"items": [5, 6], "actions": [1, 2], "timestamps": [10, 20], "bags": [[1], []]},
         "request_time": 30},
        {"user_id": "p", "candidates": [7, 8], "events": {"items": [9], "actions": [0], "timestamps": [40]},
         "request_time": 50},
        {"user_id": "q", "candidates": [7], "request_time": 50},
    ]  # fmt: skip
    answers = []
    for backend in (backend_from_package(package), cached_backend(model, cache_bytes=1 << 20)):
        with ScoringServer(backend) as server:
            out = []
            for body in bodies:
                req = urllib.request.Request(
                    server.url + "/score", json.dumps(body).encode(), {"Content-Type": "application/json"}
                )
                out.append(json.loads(urllib.request.urlopen(req, timeout=30).read()))
            health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=30).read())
            assert health["backend"] == backend.name
            answers.append(out)
    assert answers[0][0]["model_version"] == "pkg-v1"
    for exported, cached in zip(*answers, strict=True):
        assert exported["history_events"] == cached["history_events"]
        for a, b in zip(exported["scores"], cached["scores"], strict=True):
            assert all(abs(a[k] - b[k]) <= TOL for k in a)
