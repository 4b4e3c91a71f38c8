"""Export of the uncached candidate-scoring path: ``torch.export`` and an AOTInductor package.

``ScoringGraph`` is one user's ``HSTURankingModel`` forward (``[user features | history | candidates]``, every
candidate a target that sees the prefix and itself) written with plain tensor ops on the model's weights: the
TorchRec tables become plain embedding lookups and the HSTU blocks are the model's own modules calling the
``gr_kernels::hstu_attention_fwd`` custom op. Inputs are flat int64 tensors (``SCORING_INPUT_NAMES``); the numbers
of history events, candidates and bag values are dynamic dimensions (0 allowed: a cold-start user has no history).

``save_scoring_package`` compiles it with AOTInductor into one ``.pt2`` file that carries the weights and, as
package metadata, the serving spec (features, tasks, model version). ``load_scoring_package`` needs only torch,
gr_models.inference.export and ``gr_kernels`` (imported here: it registers the attention op the package calls);
no trainer or example code. The attention backend is the one resolved at export time on the export device (the
portable reference on CPU).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gr_kernels
from gr_models.inference.bias import relative_bias_rows
from gr_models.inference.requests import Candidates, InferenceInputError, UserEvents
from gr_models.ranking.features import RankingFeatureSpec
from gr_models.ranking.hstu_ranking import HSTURankingModel
from gr_models.ranking.tasks import RankingTask

SCORING_INPUT_NAMES = (
    "user_features",  # [F]
    "history_items",  # [h]
    "history_actions",  # [h]
    "history_timestamps",  # [h], non-decreasing
    "history_bag_values",  # [nh]
    "history_bag_lengths",  # [h]
    "candidate_items",  # [M]
    "candidate_timestamps",  # [M]
    "candidate_bag_values",  # [nc]
    "candidate_bag_lengths",  # [M]
    "request_time",  # [1]
)
METADATA_KEY = "gr_models.scoring_spec"
PACKAGE_FORMAT = "gr-models-scoring/1"


@dataclass(frozen=True)
class ScoringSpec:
    """What a server must know about an exported scorer to validate requests: the feature vocabularies, the
    tasks (output columns), the window limits and the model version."""

    features: RankingFeatureSpec
    tasks: tuple[RankingTask, ...]
    max_seq_len: int
    tokens_per_event: int
    model_version: str

    @property
    def max_history_events(self) -> int:
        """History events that leave the candidates' shared position inside ``max_seq_len``."""
        return (self.max_seq_len - self.features.num_user_features - 1) // self.tokens_per_event

    @property
    def max_candidates(self) -> int:
        """Candidates one uncached window holds next to a full history."""
        f, m = self.features.num_user_features, self.tokens_per_event
        return self.max_seq_len - f - m * self.max_history_events

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": PACKAGE_FORMAT,
                "features": asdict(self.features),
                "tasks": [asdict(t) for t in self.tasks],
                "max_seq_len": self.max_seq_len,
                "tokens_per_event": self.tokens_per_event,
                "model_version": self.model_version,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ScoringSpec:
        d = json.loads(text)
        if d.get("format") != PACKAGE_FORMAT:
            raise ValueError(f"not a {PACKAGE_FORMAT} scoring spec (format {d.get('format')!r})")
        feats = d["features"]
        feats["user_feature_names"] = tuple(feats["user_feature_names"])
        feats["user_feature_sizes"] = tuple(feats["user_feature_sizes"])
        return cls(
            RankingFeatureSpec(**feats),
            tuple(RankingTask(**t) for t in d["tasks"]),
            int(d["max_seq_len"]),
            int(d["tokens_per_event"]),
            str(d["model_version"]),
        )

    @classmethod
    def of_model(cls, model: HSTURankingModel, model_version: str) -> ScoringSpec:
        cfg = model.config
        return cls(cfg.features, tuple(cfg.tasks), cfg.max_seq_len, cfg.tokens_per_event, model_version)


def _table_weight(collection: nn.Module) -> torch.Tensor:
    """The single weight of a one-table TorchRec (bag) collection."""
    weights = [p for _, p in collection.named_parameters()]
    if len(weights) != 1:
        raise ValueError(f"expected one table in {type(collection).__name__}, found {len(weights)}")
    return weights[0]


class ScoringGraph(nn.Module):
    """One user's candidate scores ``[M, num_tasks]`` from flat int64 inputs (``SCORING_INPUT_NAMES``); equal to
    ``model(batch)`` for the one-window batch of the same events (eval mode, up to float summation order).

    The model must be in eval mode semantics (no dropout) and use the static item table."""

    def __init__(self, model: HSTURankingModel) -> None:
        super().__init__()
        if not isinstance(model, HSTURankingModel):
            raise TypeError(f"model must be an HSTURankingModel, got {type(model).__name__}")
        cfg = model.config
        if cfg.dynamic_item_table is not None:
            raise ValueError("export needs the static item table; a gr-dynemb dynamic table cannot be exported")
        self.config = cfg
        self.embedding_dim = cfg.embedding_dim
        self.num_user_features = cfg.features.num_user_features
        self.interleave = cfg.action_mode == "interleave"
        self.full_context = cfg.context_attention == "full"
        self.item_weight = _table_weight(model.input_embedding.item_embeddings)
        self.position_embeddings = model.input_embedding.position_embeddings
        self.user_weights = nn.ParameterList(
            [model.user_embedding.tables.embeddings[f"user_{n}_table"].weight for n in model.user_embedding.names]
        )
        self.bag_weight = None if model.bag_embedding is None else _table_weight(model.bag_embedding.bags)
        self.action_embedding = model.action_embedding
        self.blocks = model.encoder.blocks
        self.relative_bias = model.encoder.relative_bias
        self.heads = model.heads
        self.contextual_seq_len = model.contextual_seq_len
        self.eval()

    def _bag(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        starts = torch.cumsum(lengths, 0) - lengths
        return F.embedding_bag(values, self.bag_weight, starts, mode="mean")

    def forward(
        self,
        user_features: torch.Tensor,
        history_items: torch.Tensor,
        history_actions: torch.Tensor,
        history_timestamps: torch.Tensor,
        history_bag_values: torch.Tensor,
        history_bag_lengths: torch.Tensor,
        candidate_items: torch.Tensor,
        candidate_timestamps: torch.Tensor,
        candidate_bag_values: torch.Tensor,
        candidate_bag_lengths: torch.Tensor,
        request_time: torch.Tensor,
    ) -> torch.Tensor:
        f, d = self.num_user_features, self.embedding_dim
        h, m = history_items.shape[0], candidate_items.shape[0]
        per_event = 2 if self.interleave else 1
        dev = candidate_items.device

        ctx = torch.stack([w[user_features[i]] for i, w in enumerate(self.user_weights)]) if f else None
        hist = F.embedding(history_items, self.item_weight)
        cand = F.embedding(candidate_items, self.item_weight)
        if self.bag_weight is not None:
            hist = hist + self._bag(history_bag_values, history_bag_lengths)
            cand = cand + self._bag(candidate_bag_values, candidate_bag_lengths)
        action = self.action_embedding(history_actions)
        # Query time of the last history token is the request time, of the others the next event's time.
        # (Slices of the concatenation, not of the history: a slice of a dynamic size would guard it >= 1.)
        times = torch.cat([history_timestamps, request_time])
        next_t = times[1:]
        # Context rows: the request time ("full"), else the first event's time (the request time without history).
        ctx_t = request_time.expand(f) if self.full_context else times[:1].expand(f)
        if self.interleave:  # item token (query at its own time), then action token (query at the next event's)
            hist_x = torch.stack([hist, action], dim=1).reshape(-1, d)
            hist_t = history_timestamps.repeat_interleave(2)
            hist_qt = torch.stack([history_timestamps, next_t], dim=1).reshape(-1)
        else:
            hist_x, hist_t, hist_qt = hist + action, history_timestamps, next_t

        parts = [hist_x, cand] if ctx is None else [ctx, hist_x, cand]
        x = torch.cat(parts)
        n = x.shape[0]
        key_t = torch.cat([ctx_t, hist_t, candidate_timestamps])
        query_t = torch.cat([ctx_t, hist_qt, candidate_timestamps])
        positions = torch.cat(
            [
                torch.arange(f + per_event * h, device=dev, dtype=torch.int64),
                torch.full((m,), f + per_event * h, device=dev, dtype=torch.int64),
            ]
        )
        x = x * math.sqrt(d) + self.position_embeddings(positions)

        rab = None
        if self.relative_bias is not None:
            rab = relative_bias_rows(self.relative_bias, key_t, positions, query_t, positions).view(1, 1, n, n)
        offsets = torch.arange(2, device=dev, dtype=torch.int64) * n
        num_targets = torch.full((1,), m, device=dev, dtype=torch.int64)
        cfg = self.config.hstu
        for block in self.blocks:
            u, v, q, k = block.project(x)
            attn = gr_kernels.hstu_attention(
                q,
                k,
                v,
                offsets,
                n,
                alpha=cfg.qk_scale,
                scaling_seqlen=cfg.max_seq_len,
                causal=cfg.causal,
                max_attn_len=cfg.max_attn_len,
                contextual_seq_len=self.contextual_seq_len,
                num_targets=num_targets,
                rab=None if rab is None else rab.to(x.dtype),
                dropout_p=0.0,
                training=False,
                backend=cfg.attention_backend,
                validate=False,
            )
            x = block.finish(x, u, attn)
        return self.heads(x[n - m :])


def scoring_inputs(
    user_features: torch.Tensor | list[int],
    history: UserEvents,
    candidates: Candidates,
    request_time: int,
) -> tuple[torch.Tensor, ...]:
    """The flat inputs of ``ScoringGraph`` (in ``SCORING_INPUT_NAMES`` order) for one request; candidates without
    timestamps are timed at ``request_time``."""
    m = len(candidates)
    cand_t = candidates.timestamps
    if cand_t is None:
        cand_t = torch.full((m,), int(request_time), dtype=torch.int64)
    return (
        torch.as_tensor(user_features, dtype=torch.int64).reshape(-1),
        history.items,
        history.actions,
        history.timestamps,
        history.bag_values,
        history.bag_lengths,
        candidates.items,
        cand_t,
        candidates.bag_values,
        candidates.bag_lengths,
        torch.tensor([int(request_time)], dtype=torch.int64),
    )


def _example_inputs(model: HSTURankingModel) -> tuple[torch.Tensor, ...]:
    """A valid request with 2+ of everything dynamic (size 0/1 examples would specialise the export)."""
    spec = model.config.features
    bags = spec.item_bag_size > 0
    history = UserEvents.from_lists([0, 1, 0], [0, 0, 0], [10, 20, 30], [[0], [0, 0], []] if bags else None)
    candidates = Candidates.from_lists([1, 0], [[0, 0], [0]] if bags else None)
    return scoring_inputs([0] * spec.num_user_features, history, candidates, 40)


def export_scoring(model: HSTURankingModel) -> torch.export.ExportedProgram:
    """``torch.export`` of ``ScoringGraph(model)`` with dynamic history, candidate and bag-value counts."""
    graph = ScoringGraph(model)
    cfg = model.config
    f, per_event = cfg.features.num_user_features, cfg.tokens_per_event
    max_h = max((cfg.max_seq_len - f - 1) // per_event, 2)
    h = torch.export.Dim("history_events", min=0, max=max_h)
    m = torch.export.Dim("candidates", min=1, max=max(cfg.max_seq_len - f, 2))
    nh = torch.export.Dim("history_bag_values", min=0)
    nc = torch.export.Dim("candidate_bag_values", min=0)
    bags = cfg.features.item_bag_size > 0
    dims: dict[str, Any] = {
        "user_features": None,
        "history_items": {0: h},
        "history_actions": {0: h},
        "history_timestamps": {0: h},
        "history_bag_values": {0: nh} if bags else None,
        "history_bag_lengths": {0: h},
        "candidate_items": {0: m},
        "candidate_timestamps": {0: m},
        "candidate_bag_values": {0: nc} if bags else None,
        "candidate_bag_lengths": {0: m},
        "request_time": None,
    }
    example = _example_inputs(model)
    if not bags:  # a model without bags takes empty bag values (fixed size 0)
        example = tuple(
            t.new_zeros(0) if name.endswith("bag_values") else t
            for name, t in zip(SCORING_INPUT_NAMES, example, strict=True)
        )
    with torch.no_grad():
        return torch.export.export(graph, example, dynamic_shapes=dims)


def save_scoring_package(model: HSTURankingModel, path: str | Path, model_version: str) -> Path:
    """Exports and AOTInductor-compiles the scoring path into ``path`` (a ``.pt2`` file, weights included, with the
    ``ScoringSpec`` as package metadata). Compiling runs the host C++ compiler (g++ on CPU): tens of seconds."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package path must end in .pt2, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_scoring(model)
    spec = ScoringSpec.of_model(model, model_version)
    torch._inductor.aoti_compile_and_package(
        program,
        package_path=str(path),
        inductor_configs={"aot_inductor.metadata": {METADATA_KEY: spec.to_json()}},
    )
    return path


class ExportedScorer:
    """A loaded scoring package: ``scorer(user_features, history, candidates, request_time) -> [M, num_tasks]``
    (float32 task outputs, logits of binary tasks), with its ``spec``."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scoring package not found: {path}")
        self.path = path
        self._runner = torch._inductor.aoti_load_package(str(path))
        meta = self._runner.get_metadata()
        if METADATA_KEY not in meta:
            raise ValueError(f"{path} is an AOTInductor package but not a gr-models scoring package (no spec)")
        self.spec = ScoringSpec.from_json(meta[METADATA_KEY])

    def __call__(
        self,
        user_features: torch.Tensor | list[int],
        history: UserEvents,
        candidates: Candidates,
        request_time: int,
    ) -> torch.Tensor:
        spec = self.spec
        if len(candidates) < 1:
            raise InferenceInputError("no candidates to score")
        need = spec.features.num_user_features + spec.tokens_per_event * len(history) + len(candidates)
        if need > spec.max_seq_len:
            raise InferenceInputError(
                f"the window needs {need} tokens (user features + history + candidates) > max_seq_len="
                f"{spec.max_seq_len} of the exported model"
            )
        inputs = scoring_inputs(user_features, history, candidates, request_time)
        if spec.features.item_bag_size == 0:
            inputs = tuple(
                t[:0] if name.endswith("bag_values") else t for name, t in zip(SCORING_INPUT_NAMES, inputs, strict=True)
            )
        return self._runner(*inputs)


def load_scoring_package(path: str | Path) -> ExportedScorer:
    """Loads a package written by ``save_scoring_package`` (needs ``gr_kernels`` importable, nothing else)."""
    return ExportedScorer(path)
