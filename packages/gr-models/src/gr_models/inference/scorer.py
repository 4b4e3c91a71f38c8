"""Cached candidate scoring for ``HSTURankingModel``: per-user K/V of the history, delta-q appends, micro-batches.

A user's sequence is ``[F user-feature tokens | history tokens | candidates]`` (see ``gr_models.ranking``). The
scorer keeps, per user, the K/V of every HSTU layer for the prefix (features + history) in a ``KVCache`` and the raw
events in a bounded history store (so an evicted user is recomputed, never forgotten). A request

1. appends its new events to the history and brings the cached prefix up to date: only rows that changed are run
   (as delta-q queries against the cached K/V of the rows before them);
2. scores the candidates in micro-batches of ``micro_batch``: each micro-batch is a delta-q sequence whose queries
   are the candidates (the op's targets, each seeing the prefix and itself only) after the cached prefix.

When few prefix rows changed (a new request time recomputes just the last history token), they ride along: each
micro-batch's queries are ``[changed prefix rows | its candidates]`` after the cached rows before them, so the whole
request is one encoder pass (``_run_works``). The changed rows are non-targets, so they see only the rows before them
and themselves, exactly as in a prefix-only pass, and their K/V from the first micro-batch go into the cache; every
micro-batch repeats them, so this is done while the repeats cost at most one micro-batch of rows (otherwise, e.g. on a
miss with several micro-batches, the prefix runs in a pass of its own first). A pass gathers its keys from the paged
pool once for all layers into one buffer ``[L, keys, H, D]`` (each layer writes its new rows' K/V into it), builds the
encoder inputs of the computed rows only (``window.window_inputs``), the bias rows of all its queries in one call, and
ships every index it needs to the device in one non-blocking copy: a cache hit never waits for the device.

Exactness (why the results equal one uncached forward of the whole sequence, up to float summation order):

- Candidates never influence prefix rows (targets are invisible to non-targets) nor each other (group size 1), and
  all of a window's candidates share one position, so any split into micro-batches gives the same outputs.
- The last history token predicts at the *request* time (its rab query time), then at the next event's time once
  one arrives: its output of every block, hence its K/V in every later block, changes with every request time
  and on every append. The scorer therefore
  recomputes the last cached token together with the new ones (delta-q over ``[old last token, new tokens]``),
  and on a request with a new request time and no new events it recomputes just that token. Without a relative
  bias (``use_rab=False``) the query time plays no role and the old last token is kept.
- ``context_attention="full"`` models (the default) make the user features a contextual prefix whose rows see the
  whole history, with the request time as their key/query time: a new event changes those rows and through them every
  later-layer K/V, and a new request time changes every row's bias against them. For such a model (with user
  features) the cache is exact only for the same history and request time; anything else recomputes the whole prefix
  (``ScorerStats.prefix_full``, logged once). Micro-batched candidate scoring still reuses the prefix within a
  request. ``context_attention="causal"`` models put the features as an ordinary causal prefix timed at the first
  event, so nothing but the last token depends on later events or the request time: appends are incremental.
- The history window keeps the most recent ``max_history_events`` events: as many as leave the candidates' shared
  position inside the model's ``max_seq_len`` (``F + m * events + 1 <= max_seq_len``). When it slides, every
  position shifts, so the prefix is recomputed. A micro-batch may make ``prefix + micro-batch`` longer than
  ``max_seq_len``: each candidate still sees exactly the window ``[prefix | itself]`` that the model scores alone,
  so the scores equal per-candidate forwards of the plain model (the plain model cannot take all at once then).

Several users (``score_many``): the op is jagged over sequences, so the prefix updates of a group of distinct users
that do not ride along are one delta-q pass (each user's new rows after its own cached K/V), and every candidate
micro-batch of every user is one sequence of a second pass (the user's prefix K/V repeated as its past). Users are all
looked up before anything runs, every pass reads the pool before anything is written back (the stores come last),
and a user evicted meanwhile by another's reservation is written back whole. Passes are bounded by
``max_batch_bias_bytes`` because the op takes the bias of a delta-q pass as a ``[B, 1, N, N]`` square of which only
the query rows are read (one reused buffer holds it).

tests/gr_models/test_inference_scorer.py proves each claim against ``full_recompute`` (the plain model), including
negative controls: skipping the last-token recompute, or appending incrementally to a "full" model, fails them, and
``score_many`` against ``score`` called per request; a cache hit is one pass and caches the K/V a prefix-only pass
gives.

Not thread-safe: a server serialises calls to one scorer (or runs one per worker).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from gr_models.data.ranking import RankingBatch
from gr_models.inference.bias import relative_bias_rows
from gr_models.inference.cast_model import CastRankingModel, resolve_dtype
from gr_models.inference.kv_cache import CacheCapacityError, KVCache, copy_rows_, select_rows
from gr_models.inference.lru import LruDict
from gr_models.inference.pass_graphs import PassGraphs, PassShape, pass_shape, round_up
from gr_models.inference.requests import Candidates, InferenceInputError, UserEvents
from gr_models.inference.window import (
    WindowIds,
    WindowInputs,
    WindowRows,
    embed_window,
    embed_window_ids,
    window_ids,
)
from gr_models.modules.relative_bias import RAB_ROW_ALIGN
from gr_models.ranking.hstu_ranking import HSTURankingModel
from gr_models.transfer import to_device

logger = logging.getLogger(__name__)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's parameters and buffers (the default ``model_version``)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class UserHistory:
    """What the scorer remembers of a user: features and the events of the current window. ``dropped`` counts the
    events that slid out of the window (they shift every position)."""

    user_features: torch.Tensor  # int64 [F]
    events: UserEvents
    dropped: int = 0


@dataclass
class _PrefixState:
    """``KVCache`` entry meta: the cached rows are the prefix of this history window as of this request time."""

    user_features: torch.Tensor
    dropped: int
    num_events: int
    request_time: int


@dataclass
class ScorerStats:
    requests: int = 0
    candidates: int = 0
    prefix_reused: int = 0  # prefix served from the cache as is
    prefix_incremental: int = 0  # only the changed tail recomputed (delta q)
    prefix_full: int = 0  # whole prefix recomputed (miss, window slid, features changed, or a "full" context model)
    prefix_uncacheable: int = 0  # prefix larger than the whole cache: computed and used without caching
    tokens_computed: int = 0  # prefix tokens run through the encoder
    encoder_passes: int = 0  # jagged delta-q passes through the encoder (one call per block each), all users together
    padded_passes: int = 0  # passes padded to a bucket (replayed from a CUDA graph on CUDA)
    graph_captures: int = 0  # CUDA graphs captured (one per new bucket)
    full_fallback_reasons: dict[str, int] = field(default_factory=dict)


class UserRequest(NamedTuple):
    """One user's request in ``CachedRankingScorer.score_many``: the arguments of ``score`` (a plain 5-tuple in this
    order works the same)."""

    user_id: Hashable
    user_features: Sequence[int] | torch.Tensor
    new_events: UserEvents | None
    candidates: Candidates
    request_time: int


@dataclass
class _PrefixPlan:
    """A request's prefix ``[0, end)``: rows ``[start, end)`` are to be run after the cached rows ``[0, start)``,
    which live in the pool at ``past_slots`` (CPU int64). ``compute=False``: the cache holds all of it (``start ==
    end``, ``past_slots`` covers the prefix)."""

    start: int
    end: int
    past_slots: torch.Tensor
    compute: bool


@dataclass
class _Work:
    """One user's request inside a call: its plan, its rows of the call's inputs and, once run, where its whole
    prefix K/V is (a pass's key buffer and the first row there)."""

    user_id: Hashable
    hist: UserHistory
    request_time: int
    candidates: Candidates
    plan: _PrefixPlan
    inputs: WindowInputs | None = None
    fused: bool = False  # prefix rows run as extra queries of every candidate micro-batch (one pass)
    prefix_kv: tuple[torch.Tensor, torch.Tensor, int] | None = None


@dataclass
class _Seq:
    """One sequence of a jagged delta-q pass: keys = ``num_past`` rows taken from the pool (``work.plan
    .past_slots``) or, with ``from_prefix``, from the work's computed prefix; queries = its ``num_prefix_q`` prefix
    rows ``[num_past, P)`` then candidates ``[c0, c1)`` (the op's targets)."""

    work: _Work
    num_past: int
    num_prefix_q: int
    c0: int = 0
    c1: int = 0
    from_prefix: bool = False

    @property
    def num_q(self) -> int:
        return self.num_prefix_q + self.c1 - self.c0

    @property
    def length(self) -> int:
        return self.num_past + self.num_q


def _eager_max_len(seqs: Sequence[_Seq]) -> int:
    """An eager pass's max_seq_len (its bias square's side): the longest sequence, rows aligned for TMA."""
    return round_up(max(s.length for s in seqs), RAB_ROW_ALIGN)


# Padded-pass layouts whose index arrays a scorer keeps (``_pass_pieces``), and window layouts whose computed rows it
# keeps (``window_ids``): a few per bucket in use.
_MAX_PASS_LAYOUTS = 32
_MAX_WINDOW_LAYOUTS = 32

# Window id pieces of a CUDA-graph pass (item rows, bag values) are padded to multiples of this.
WINDOW_GRANULE = 64


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device while 0 is the current one (``==`` says they differ)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index or a.index is None or b.index is None
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


class _CallInputs:
    """The encoder inputs of one ``_run_works`` call: the host ids of its computed rows, and the rows themselves on
    the device once an eager pass needs them (a CUDA-graph pass rebuilds them from the ids inside the graph)."""

    def __init__(self, scorer: CachedRankingScorer, ids: WindowIds) -> None:
        self.scorer, self.ids = scorer, ids
        self._x: torch.Tensor | None = None

    def eager(self) -> torch.Tensor:
        if self._x is None:
            sc = self.scorer
            self._x = embed_window_ids(sc.model, self.ids, sc.device, sc.dtype)
        return self._x


class CachedRankingScorer:
    """Scores candidates for a user (``score``) or a group of users (``score_many``) against their cached histories
    (module docstring).

    Args:
        model: a trained ``HSTURankingModel`` (put in eval mode; its embedding tables are used as they are).
        cache: a ``KVCache`` shaped for ``model.config.hstu``, in this scorer's dtype and device.
        micro_batch: candidates per delta-q call.
        dtype: compute dtype of the encoder and heads (a cast copy of them is made for bf16/fp16); embeddings are
            looked up in the model's dtype and cast.
        model_version: stamp of cached entries (default: a hash of the model's weights); entries of another version
            are invalidated on lookup.
        max_candidates: more candidates in one request is an error.
        max_users: users whose event history is kept (least recently used are forgotten beyond that).
        max_batch_bias_bytes: memory bound of one jagged encoder pass: the attention op takes the relative bias
            of a delta-q pass as a full ``[B, 1, N, N]`` square (B sequences, N the longest), so a pass holds
            sequences while ``B * N * N * itemsize`` stays within this (the same bound caps a pass's padded work
            when the model has no bias); a sequence above it on its own runs alone. The default holds three
            micro-batches of a 4096-event history in fp32 (seven in bf16), so a cache hit with 256 candidates in
            micro-batches of 128 is one pass.
        cuda_graphs: pad every pass whose keys all come from the pool (every cache hit) to a shape bucket and, on
            CUDA, replay it from a CUDA graph captured per bucket (``pass_graphs``); on the CPU the padded pass runs
            eagerly. Default: on for a CUDA cache.
        max_graphs: buckets kept (least recently used dropped first); each holds its pass's key and bias buffers.
    """

    def __init__(
        self,
        model: HSTURankingModel,
        cache: KVCache,
        *,
        micro_batch: int = 64,
        dtype: torch.dtype | str = torch.float32,
        model_version: str | None = None,
        max_candidates: int = 4096,
        max_users: int = 100_000,
        max_batch_bias_bytes: int = 256 << 20,
        cuda_graphs: bool | None = None,
        max_graphs: int = 8,
    ) -> None:
        if not isinstance(model, HSTURankingModel):
            raise TypeError(f"model must be an HSTURankingModel, got {type(model).__name__}")
        cfg = model.config
        self.dtype = resolve_dtype(dtype)
        if not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch must be an int >= 1, got {micro_batch!r}")
        if max_candidates < 1 or max_users < 1:
            raise ValueError(f"max_candidates and max_users must be >= 1, got {max_candidates}, {max_users}")
        if not isinstance(max_batch_bias_bytes, int) or max_batch_bias_bytes < 1:
            raise ValueError(f"max_batch_bias_bytes must be an int >= 1, got {max_batch_bias_bytes!r}")
        h = cfg.hstu
        want = (h.num_blocks, h.num_heads, h.qk_dim, h.v_dim)
        got = (cache.num_layers, cache.num_heads, cache.qk_dim, cache.v_dim)
        if want != got:
            raise ValueError(f"cache is shaped (layers, heads, qk_dim, v_dim)={got}, the model needs {want}")
        if cache.dtype != self.dtype:
            raise ValueError(f"cache dtype {cache.dtype} differs from the scorer dtype {self.dtype}")
        f, m = cfg.features.num_user_features, cfg.tokens_per_event
        self.max_history_events = (cfg.max_seq_len - f - 1) // m
        if self.max_history_events < 0:
            raise ValueError(f"max_seq_len={cfg.max_seq_len} leaves no room for {f} user features and a candidate")
        self.cast_model = CastRankingModel(model, self.dtype)
        self.model, self.encoder, self.heads = model, self.cast_model.encoder, self.cast_model.heads
        self.device = cache.device
        self.cache = cache
        self.micro_batch = micro_batch
        self.max_candidates = max_candidates
        self.max_users = max_users
        self.max_batch_bias_bytes = max_batch_bias_bytes
        self.model_version = model_fingerprint(model) if model_version is None else str(model_version)
        self.num_features, self.tokens_per_event = f, m
        # Which cached rows a change invalidates (module docstring).
        self.incremental = cfg.context_attention == "causal" or f == 0
        self.time_dependent = h.use_rab
        self._histories: OrderedDict[Hashable, UserHistory] = OrderedDict()
        self.stats = ScorerStats()
        self._logged_full_context = False
        self._rab_buffer: torch.Tensor | None = None  # flat, zero-initialised; see _shared_rab_buffer
        # A padded pass's index arrays that depend only on its layout (see _pass_pieces), least recently used first.
        self._pass_layouts: LruDict[tuple, dict[str, np.ndarray]] = LruDict(_MAX_PASS_LAYOUTS)
        self._window_layouts: LruDict = LruDict(_MAX_WINDOW_LAYOUTS)  # window_ids' memo of computed rows per layout
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.graphs = PassGraphs(max_graphs) if cuda_graphs else None
        # A padded pass builds its input rows inside its graph (a hit then issues no embedding launches of its own)
        # when the tables live on the cache's device and the item table is static (a dynamic table's lookup inserts
        # and may read counts back: not capturable).
        self._window_in_graph = (
            self.graphs is not None
            and cfg.dynamic_item_table is None
            and _same_device(self._embedding_device(), self.device)
        )

    # -- public API ----------------------------------------------------------------------------------------------

    def score(
        self,
        user_id: Hashable,
        user_features: Sequence[int] | torch.Tensor,
        new_events: UserEvents | None,
        candidates: Candidates,
        request_time: int,
    ) -> torch.Tensor:
        """Append ``new_events`` (may be None or empty) to the user's history, then score ``candidates`` at
        ``request_time``: ``[M, num_tasks]`` task outputs (logits for binary tasks) in the scorer dtype, row ``i``
        for candidate ``i``. An unknown user starts with an empty history (cold start)."""
        feats = self._check_features(user_features)
        self._check_candidates(candidates)
        hist, request_time = self._update_history(user_id, feats, new_events, request_time)
        with torch.inference_mode():
            [out] = self._run_works([(user_id, hist, request_time, candidates)])
        self.stats.requests += 1
        self.stats.candidates += len(candidates)
        return out

    def score_many(self, requests: Sequence[UserRequest | tuple]) -> list[torch.Tensor | InferenceInputError]:
        """``score`` for several users at once: result ``i`` equals ``score(*requests[i])`` called in list order.

        The users' prefix updates (appends, recomputes) go through one jagged delta-q encoder pass, then all their
        candidate micro-batches through another (each pass split only to keep its bias within
        ``max_batch_bias_bytes``). A user repeated in the list splits it into runs of distinct users, taken in order,
        so a user's later request sees the earlier one's events.

        A malformed request (``score`` would raise ``InferenceInputError``) changes nothing and its error is returned
        in its place, not raised: the other requests are scored as if it had not been sent. Other exceptions (a
        failing kernel) propagate for the whole call; histories updated by then stay consistent with the cache
        (its entries carry the state they were computed for)."""
        results: list[torch.Tensor | InferenceInputError] = []
        for run in self._distinct_runs(requests):
            results.extend(self._score_distinct(run))
        return results

    @property
    def num_users(self) -> int:
        """Users whose history is kept (at most ``max_users``)."""
        return len(self._histories)

    def append(
        self,
        user_id: Hashable,
        user_features: Sequence[int] | torch.Tensor,
        new_events: UserEvents,
        request_time: int | None = None,
    ) -> None:
        """Record new events and bring the user's cached prefix up to date (at ``request_time``, default the last
        event's time) without scoring anything."""
        feats = self._check_features(user_features)
        if request_time is None:
            last = new_events.last_timestamp if new_events is not None else None
            stored = self._histories.get(user_id)
            last = last if last is not None else (stored.events.last_timestamp if stored is not None else None)
            request_time = 0 if last is None else last
        hist, request_time = self._update_history(user_id, feats, new_events, request_time)
        with torch.inference_mode():
            self._run_works([(user_id, hist, request_time, Candidates.from_lists([]))])

    def invalidate(self, user_id: Hashable) -> bool:
        """Drop the user's cached K/V (the history is kept: the next request recomputes the prefix)."""
        return self.cache.invalidate(user_id)

    def forget(self, user_id: Hashable) -> None:
        """Drop the user's cached K/V and history (the next request is a cold start)."""
        self.cache.invalidate(user_id)
        self._histories.pop(user_id, None)

    def history(self, user_id: Hashable) -> UserHistory | None:
        return self._histories.get(user_id)

    def full_recompute(
        self,
        user_features: Sequence[int] | torch.Tensor,
        history: UserEvents,
        candidates: Candidates,
        request_time: int,
    ) -> torch.Tensor:
        """The uncached reference: one forward of the model over ``[features | history | all candidates]`` (the
        training forward, in the scorer's dtype), no cache, no micro-batches. ``[M, num_tasks]``."""
        feats = self._check_features(user_features)
        self._check_candidates(candidates)
        self._check_events(history, None, request_time)
        cfg = self.model.config
        need = self.num_features + self.tokens_per_event * len(history) + len(candidates)
        if need > cfg.max_seq_len:
            raise InferenceInputError(
                f"full recompute needs {need} tokens (features + history + all candidates) > max_seq_len="
                f"{cfg.max_seq_len}; score in micro-batches instead"
            )
        batch = self._batch(UserHistory(feats, history), candidates, request_time)
        return self.cast_model(batch.to(self._embedding_device()))

    def full_recompute_user(self, user_id: Hashable, candidates: Candidates, request_time: int) -> torch.Tensor:
        """``full_recompute`` on the stored history of ``user_id`` (which must be known)."""
        hist = self._histories.get(user_id)
        if hist is None:
            raise KeyError(f"unknown user {user_id!r}")
        return self.full_recompute(hist.user_features, hist.events, candidates, request_time)

    # -- input checks --------------------------------------------------------------------------------------------

    def _check_features(self, user_features: Sequence[int] | torch.Tensor) -> torch.Tensor:
        spec = self.model.config.features
        try:
            feats = torch.as_tensor(user_features, dtype=torch.int64).reshape(-1).cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InferenceInputError(f"user_features must be {spec.num_user_features} integers: {exc}") from exc
        if feats.numel() != spec.num_user_features:
            raise InferenceInputError(
                f"user_features has {feats.numel()} values, the model expects {spec.num_user_features} "
                f"({', '.join(spec.user_feature_names)})"
            )
        for name, size, value in zip(spec.user_feature_names, spec.user_feature_sizes, feats.tolist(), strict=True):
            if not 0 <= value < size:
                raise InferenceInputError(f"user feature {name!r} = {value} outside [0, {size})")
        return feats

    def _check_items(self, what: str, items: torch.Tensor, bag_values: torch.Tensor) -> None:
        # In NumPy (min/max first, the offending value only on failure): these checks run on every request.
        spec = self.model.config.features
        ids, values = items.numpy(), bag_values.numpy()
        if self.model.config.dynamic_item_table is None and ids.size:
            if ids.min() < 0 or ids.max() >= spec.num_items:
                bad = (ids < 0) | (ids >= spec.num_items)
                raise InferenceInputError(f"{what} item id {int(ids[bad][0])} outside [0, {spec.num_items})")
        elif ids.size and ids.min() < 0:
            raise InferenceInputError(f"{what} item ids must be >= 0")
        if values.size:
            if spec.item_bag_size == 0:
                raise InferenceInputError(f"{what} carry item bags but the model has none")
            if values.min() < 0 or values.max() >= spec.item_bag_size:
                bad = (values < 0) | (values >= spec.item_bag_size)
                raise InferenceInputError(f"{what} bag value {int(values[bad][0])} outside [0, {spec.item_bag_size})")

    def _check_events(self, events: UserEvents, after: int | None, request_time: int) -> None:
        if not isinstance(events, UserEvents):
            raise InferenceInputError(f"events must be UserEvents, got {type(events).__name__}")
        self._check_items("events", events.items, events.bag_values)
        spec = self.model.config.features
        if len(events) and ((events.actions < 0) | (events.actions >= spec.num_actions)).any():
            raise InferenceInputError(f"event actions must lie in [0, {spec.num_actions})")
        if len(events):
            if after is not None and int(events.timestamps[0]) < after:
                raise InferenceInputError(
                    f"new events start at t={int(events.timestamps[0])}, before the user's last event (t={after})"
                )
            if int(events.timestamps[-1]) > request_time:
                raise InferenceInputError(
                    f"an event at t={int(events.timestamps[-1])} is after the request time {request_time}"
                )

    def _check_candidates(self, candidates: Candidates) -> None:
        if not isinstance(candidates, Candidates):
            raise InferenceInputError(f"candidates must be Candidates, got {type(candidates).__name__}")
        if len(candidates) == 0:
            raise InferenceInputError("no candidates to score")
        if len(candidates) > self.max_candidates:
            raise InferenceInputError(f"{len(candidates)} candidates > max_candidates={self.max_candidates}")
        self._check_items("candidates", candidates.items, candidates.bag_values)

    # -- history and tokens --------------------------------------------------------------------------------------

    def _update_history(
        self, user_id: Hashable, feats: torch.Tensor, new_events: UserEvents | None, request_time: int
    ) -> tuple[UserHistory, int]:
        if isinstance(request_time, bool) or not isinstance(request_time, int):
            raise InferenceInputError(f"request_time must be an int (unix seconds), got {request_time!r}")
        hist = self._histories.get(user_id)
        events = new_events  # None: no new events (nothing to check or append)
        if events is not None:
            self._check_events(events, None if hist is None else hist.events.last_timestamp, request_time)
        if hist is None:
            hist = UserHistory(feats, UserEvents.empty())
            self._histories[user_id] = hist
            while len(self._histories) > self.max_users:
                forgotten, _ = self._histories.popitem(last=False)
                self.cache.invalidate(forgotten)
        elif hist.events.last_timestamp is not None and request_time < hist.events.last_timestamp:
            raise InferenceInputError(
                f"request_time {request_time} is before the user's last event (t={hist.events.last_timestamp})"
            )
        self._histories.move_to_end(user_id)
        hist.user_features = feats
        if events is not None and len(events):
            merged = hist.events.concat(events)
            excess = len(merged) - self.max_history_events
            if excess > 0:
                merged = merged.tail(self.max_history_events)
                hist.dropped += excess
            hist.events = merged
        return hist, request_time

    def _batch(self, hist: UserHistory, candidates: Candidates, request_time: int) -> RankingBatch:
        """The one-window batch ``[features | history | candidates]`` the model's own input layer reads."""
        ev, m = hist.events, len(candidates)
        cand_t = torch.full((m,), request_time, dtype=torch.int64) if candidates.timestamps is None else None
        return RankingBatch(
            users=torch.zeros(1, dtype=torch.int64),
            user_features=hist.user_features.view(1, -1),
            history_lengths=torch.tensor([len(ev)]),
            history_items=ev.items,
            history_actions=ev.actions,
            history_timestamps=ev.timestamps,
            history_bag_values=ev.bag_values,
            history_bag_lengths=ev.bag_lengths,
            candidate_lengths=torch.tensor([m]),
            candidate_items=candidates.items,
            candidate_timestamps=candidates.timestamps if cand_t is None else cand_t,
            candidate_bag_values=candidates.bag_values,
            candidate_bag_lengths=candidates.bag_lengths,
            request_timestamps=torch.tensor([request_time]),
            labels={},
        )

    def _embedding_device(self) -> torch.device:
        return self.model.action_embedding.weight.device

    # -- prefix --------------------------------------------------------------------------------------------------

    def _full_reason(self, user_id: Hashable, hist: UserHistory, request_time: int) -> tuple[str | None, int]:
        """Why the whole prefix must be recomputed (None: it need not) and, if not, the first row to recompute."""
        entry = self.cache.lookup(user_id, self.model_version)
        if entry is None:
            return "miss", 0
        state: _PrefixState = entry.meta
        if not torch.equal(state.user_features, hist.user_features):
            return "user features changed", 0
        if state.dropped != hist.dropped:
            return "history window slid", 0
        n_old, n_new = state.num_events, len(hist.events)
        time_changed = self.time_dependent and state.request_time != request_time
        if n_old == n_new and not time_changed:
            return None, entry.num_tokens
        if not self.incremental:
            return "context rows see the whole history (context_attention='full')", 0
        # The old last token predicts at the request time (or the next event's time) when there is a rab.
        return None, max(entry.num_tokens - 1, 0) if self.time_dependent else entry.num_tokens

    def _plan_prefix(self, user_id: Hashable, hist: UserHistory, request_time: int) -> _PrefixPlan:
        """Looks the user up; says which prefix rows must be run and where the cached rows before them are."""
        p = self.num_features + self.tokens_per_event * len(hist.events)
        reason, start = self._full_reason(user_id, hist, request_time)
        if reason is not None:
            self.stats.prefix_full += 1
            self.stats.full_fallback_reasons[reason] = self.stats.full_fallback_reasons.get(reason, 0) + 1
            if not self.incremental and reason.startswith("context") and not self._logged_full_context:
                logger.info("context_attention='full' model: every append or new request time recomputes the prefix")
                self._logged_full_context = True
        elif start == p:
            self.stats.prefix_reused += 1
            return _PrefixPlan(p, p, self.cache.slots(user_id, 0, p), compute=False)
        else:
            self.stats.prefix_incremental += 1
        slots = self.cache.slots(user_id, 0, start) if start > 0 else torch.zeros(0, dtype=torch.int64)
        return _PrefixPlan(start, p, slots, compute=True)

    def _run_works(self, items: Sequence[tuple[Hashable, UserHistory, int, Candidates]]) -> list[torch.Tensor | None]:
        """Brings the cached prefixes of distinct users ``(user_id, history, request_time, candidates)`` up to date
        and scores their candidates: ``[M, T]`` per user (None where there are no candidates, e.g. ``append``).

        Every user is looked up before anything runs, every pass reads the pool before anything is written back
        (the stores come last), and ``_store_prefix`` handles users evicted or forgotten meanwhile. A user whose
        changed prefix rows are few (typically the last history token at a new request time) runs them as extra
        queries of each of its candidate micro-batches: one encoder pass for the whole request. Otherwise its prefix
        rows go through a pass of their own first."""
        works = [_Work(u, hist, t, cands, self._plan_prefix(u, hist, t)) for u, hist, t, cands in items]
        rows = [
            WindowRows(w.hist.user_features, w.hist.events, w.candidates, w.request_time, w.plan.start) for w in works
        ]
        x = _CallInputs(self, window_ids(self.model, rows, self._window_layouts))
        prefix_seqs, cand_seqs = [], []
        for w, inp in zip(works, x.ids.infos, strict=True):
            w.inputs = inp
            n_new, m = w.plan.end - w.plan.start, len(w.candidates)
            micro_batches = -(-m // self.micro_batch)
            # Fusing repeats the prefix rows in every micro-batch: worth it while that costs at most one more.
            w.fused = n_new > 0 and micro_batches > 0 and (micro_batches - 1) * n_new <= self.micro_batch
            if n_new and not w.fused:
                prefix_seqs.append(_Seq(w, w.plan.start, n_new))
            for i in range(0, m, self.micro_batch):
                j = min(i + self.micro_batch, m)
                if w.fused:
                    cand_seqs.append(_Seq(w, w.plan.start, n_new, i, j))
                else:
                    cand_seqs.append(_Seq(w, w.plan.end, 0, i, j, from_prefix=n_new > 0))
        if prefix_seqs:
            self._run_batched(prefix_seqs, x, need_output=False)
        outs: list[torch.Tensor | None] = [None] * len(works)
        if cand_seqs:
            y = self._run_batched(cand_seqs, x, need_output=True)
            scores = self.heads(y).split([len(w.candidates) for w in works])
            outs = [out if len(w.candidates) else None for w, out in zip(works, scores, strict=True)]
        for w in works:
            if w.plan.compute:
                self._store_prefix(w)
        return outs

    def _store_prefix(self, w: _Work) -> None:
        """Writes the computed rows into the user's entry (all of them if the entry was evicted meanwhile)."""
        user_id, plan = w.user_id, w.plan
        k_all, v_all, row = w.prefix_kv
        self.stats.tokens_computed += plan.end - plan.start
        if self._histories.get(user_id) is not w.hist:
            # A later request of the same score_many call forgot this user (max_users): cache nothing for it.
            self.cache.invalidate(user_id)
            return
        # Another user's reservation in the same call may have evicted the entry: then write every row again.
        start = plan.start if user_id in self.cache else 0
        state = _PrefixState(w.hist.user_features.clone(), w.hist.dropped, len(w.hist.events), w.request_time)
        try:
            self.cache.reserve(user_id, self.model_version, plan.end).meta = state
            rows = slice(row + start, row + plan.end)
            self.cache.write_rows(user_id, start, k_all[:, rows], v_all[:, rows])
        except CacheCapacityError:
            self.cache.invalidate(user_id)
            self.stats.prefix_uncacheable += 1

    # -- several users -------------------------------------------------------------------------------------------

    @staticmethod
    def _distinct_runs(requests: Sequence[UserRequest | tuple]) -> list[list[UserRequest | InferenceInputError]]:
        """Consecutive runs of requests of distinct users (a repeated user starts a new run); a request that is not
        a ``UserRequest``-shaped tuple with a hashable user id becomes its error."""
        runs: list[list[UserRequest | InferenceInputError]] = []
        run: list[UserRequest | InferenceInputError] = []
        seen: set[Hashable] = set()
        for raw in requests:
            try:
                request = raw if isinstance(raw, UserRequest) else UserRequest(*raw)
                hash(request.user_id)
            except TypeError as exc:
                run.append(
                    InferenceInputError(
                        "a request must be (user_id, user_features, new_events, candidates, request_time) with a "
                        f"hashable user_id: {exc}"
                    )
                )
                continue
            if request.user_id in seen:
                runs.append(run)
                run, seen = [], set()
            run.append(request)
            seen.add(request.user_id)
        if run:
            runs.append(run)
        return runs

    def _score_distinct(self, run: list[UserRequest | InferenceInputError]) -> list[torch.Tensor | InferenceInputError]:
        """``score_many`` on requests of distinct users: histories updated in order (each request checked before it
        changes anything), then the prefixes and candidates of all valid ones together."""
        results: list[torch.Tensor | InferenceInputError | None] = [None] * len(run)
        live = []  # (index, user_id, history, request_time, candidates)
        for i, request in enumerate(run):
            if isinstance(request, InferenceInputError):
                results[i] = request
                continue
            try:
                feats = self._check_features(request.user_features)
                self._check_candidates(request.candidates)
                hist, request_time = self._update_history(
                    request.user_id, feats, request.new_events, request.request_time
                )
            except InferenceInputError as exc:
                results[i] = exc
                continue
            live.append((i, request.user_id, hist, request_time, request.candidates))
        if live:
            with torch.inference_mode():
                outs = self._run_works([(u, hist, t, cands) for _, u, hist, t, cands in live])
            for (i, *_, cands), out in zip(live, outs, strict=True):
                results[i] = out
                self.stats.requests += 1
                self.stats.candidates += len(cands)
        return results  # type: ignore[return-value]

    # -- the encoder on jagged slices of rows --------------------------------------------------------------------

    def _run_batched(self, seqs: list[_Seq], x: _CallInputs, *, need_output: bool) -> torch.Tensor | None:
        """``_run_pass`` over ``seqs`` in as few passes as ``max_batch_bias_bytes`` allows: sequences sorted by
        length, longest first, so each pass pads to about its own longest. With ``need_output``, the final outputs
        of every candidate ``[sum M, D]``, in user then candidate order."""
        order = sorted(range(len(seqs)), key=lambda i: -seqs[i].length)
        itemsize = self.dtype.itemsize
        outs, done = [], []
        pos = 0
        while pos < len(order):
            longest = seqs[order[pos]].length
            count = max(1, self.max_batch_bias_bytes // (longest * longest * itemsize))
            chunk = order[pos : pos + count]
            out = self._run_pass([seqs[i] for i in chunk], x, need_output)
            if need_output:
                outs.append(out)
                done += chunk
            pos += len(chunk)
        if not need_output:
            return None
        y = outs[0] if len(outs) == 1 else torch.cat(outs)
        # Candidate rows came out pass by pass, sequence by sequence; ``seqs`` are in user then candidate order.
        if done != sorted(done):
            starts = list(itertools.accumulate((seqs[i].c1 - seqs[i].c0 for i in done), initial=0))
            perm = torch.cat(
                [torch.arange(starts[k], starts[k + 1]) for k in sorted(range(len(done)), key=done.__getitem__)]
            )
            y = y.index_select(0, to_device(perm, y.device))
        return y

    def _run_pass(self, seqs: list[_Seq], x: _CallInputs, need_output: bool) -> torch.Tensor | None:
        """The queries of every sequence through every block as one jagged delta-q call per block, on one key buffer
        per pass (``[L, keys, H, D]``: gathered once from the pool for all layers, each layer writing its new rows'
        K/V into it). Every index the pass needs is built on the host and copied to the device at once, so the pass
        never waits for the device. A pass whose keys all come from the pool (every cache hit) is padded to a bucket
        and, on CUDA, replayed from a CUDA graph (``pass_graphs``). Leaves each computed prefix's K/V on its work
        (``_Work.prefix_kv``); returns the candidates' final outputs (``need_output``)."""
        shape = None
        if self.graphs is not None and not any(s.from_prefix for s in seqs):
            shape = pass_shape(
                [s.length for s in seqs],
                [s.num_q for s in seqs],
                sum(s.c1 - s.c0 for s in seqs),
                x.ids.rows,
                need_output=need_output,
            )
        pieces, kv_offsets, any_pool, copies = self._pass_pieces(seqs, need_output, shape)
        if shape is None:
            b, n, max_q = len(seqs), _eager_max_len(seqs), max(s.num_q for s in seqs)
            sizes = [a.size for a in pieces.values()]
            packed = to_device(torch.from_numpy(np.concatenate(list(pieces.values()))), self.device)
            d = dict(zip(pieces, packed.split(sizes), strict=True))
            k_all, v_all, out = self._encode(
                d, x.eager(), self._shared_rab_buffer(b, n), b, n, max_q, kv_offsets[-1], need_output, any_pool, copies
            )
        else:
            b, n, max_q = shape.num_seqs, shape.max_len, shape.max_q
            # The input rows: built inside the graph from the padded ids (no embedding launches on a hit), or copied
            # in from the eager ones.
            xs_host, num_items = None, 0
            if self._window_in_graph:
                window, num_items = x.ids.host_pieces(
                    round_up(x.ids.items.numel() + 1, WINDOW_GRANULE),
                    round_up(x.ids.bag_values.numel(), WINDOW_GRANULE),
                    shape.x_rows,
                )
                pieces.update(window)
            else:
                xs_host = x.eager()

            def statics() -> dict[str, torch.Tensor]:
                if self.encoder.relative_bias is None:
                    return {}
                return {"rab": torch.zeros(b * n * n, device=self.device, dtype=self.dtype)}

            def encode(d, xs, st):
                if xs is None:
                    xs = embed_window(self.model, d, num_items, self.dtype)
                return self._encode(d, xs, st.get("rab"), b, n, max_q, shape.keys, need_output, True, {})

            key = (shape.bucket, tuple((name, a.size) for name, a in pieces.items()))
            k_all, v_all, out = self.graphs.run(key, list(pieces), list(pieces.values()), self.device, xs_host,
                                                shape.x_rows, statics, encode)  # fmt: skip
            if out is not None:
                out = out[: sum(s.c1 - s.c0 for s in seqs)]
            self.stats.padded_passes += 1
            self.stats.graph_captures = self.graphs.captures
        self.stats.encoder_passes += 1
        for i, s in enumerate(seqs):
            if s.num_prefix_q and s.c0 == 0:  # the first sequence with the user's computed rows keeps them
                s.work.prefix_kv = (k_all, v_all, kv_offsets[i])
        return out

    def _pass_pieces(
        self, seqs: list[_Seq], need_output: bool, shape: PassShape | None
    ) -> tuple[dict[str, np.ndarray], list[int], bool, dict]:
        """``_build_pass_pieces``, reusing for a padded pass (every cache hit) the arrays that depend only on its
        layout: a hit repeated at a new request time has the same bucket and sequences, so only the pool slots, key
        times and query times (the pieces read from the user's entry, history and request) are rebuilt. The layout
        key holds every number the reused arrays are computed from, so a reused array equals a rebuilt one; the
        data pieces are rebuilt on every call, so nothing cached can go stale when an entry's pages, history or
        model version change."""
        if shape is None or any(s.from_prefix for s in seqs):
            return self._build_pass_pieces(seqs, need_output, shape)
        layout = (
            shape,
            need_output,
            tuple(
                (s.num_past, s.num_prefix_q, s.c0, s.c1, s.work.inputs.row0, s.work.inputs.num_prefix_rows,
                 s.work.inputs.prefix_len)
                for s in seqs
            ),
        )  # fmt: skip
        cached = self._pass_layouts.lookup(layout)
        if cached is None:
            pieces, kv_offsets, any_pool, copies = self._build_pass_pieces(seqs, need_output, shape)
            self._pass_layouts.store(layout, pieces)
            return dict(pieces), kv_offsets, any_pool, copies
        pieces = dict(cached)  # the reused arrays are only read (packed into the staging buffer)
        kv_offsets = cached["kv_offsets"].tolist()
        pool_rows = np.zeros(kv_offsets[-1], dtype=np.int64)
        for s, ks in zip(seqs, kv_offsets, strict=False):
            if s.num_past:
                pool_rows[ks : ks + s.num_past] = s.work.plan.past_slots.numpy()[: s.num_past]
        pieces["pool_rows"] = pool_rows
        if self.encoder.relative_bias is not None:
            pieces["key_times"], pieces["q_time"] = self._bias_times(seqs, shape.max_len, shape)
        return pieces, kv_offsets, True, {}

    def _build_pass_pieces(
        self, seqs: list[_Seq], need_output: bool, shape: PassShape | None
    ) -> tuple[dict[str, np.ndarray], list[int], bool, dict]:
        """Host side of a pass: its index arrays (int64 NumPy: a hit's few dozen small steps cost a fraction of what
        torch's CPU ops do; with ``shape``, padded to it by one padding sequence of ``shape.pad_past`` pool rows at
        slot 0 and ``shape.pad_queries`` queries reading input row 0), the key offsets, whether keys come from the
        pool, and the key copies from computed prefixes (eager passes only)."""
        kv_offsets = list(itertools.accumulate((s.length for s in seqs), initial=0))
        q_offsets = list(itertools.accumulate((s.num_q for s in seqs), initial=0))
        if shape is not None:
            kv_offsets.append(kv_offsets[-1] + shape.pad_past + shape.pad_queries)
            q_offsets.append(q_offsets[-1] + shape.pad_queries)
        pool_rows = np.zeros(kv_offsets[-1], dtype=np.int64)  # slot 0 for rows filled otherwise (or padding)
        any_pool = shape is not None
        copies: dict[int, tuple[tuple[torch.Tensor, torch.Tensor], list[np.ndarray], list[np.ndarray]]] = {}
        key_rows, q_rows, cand_rows = [], [], []
        for b, s in enumerate(seqs):
            w, ks = s.work, kv_offsets[b]
            if s.from_prefix:  # the prefix this call computed (a pass's key buffer)
                k_src, v_src, row = w.prefix_kv
                _, dst, src = copies.setdefault(id(k_src), ((k_src, v_src), [], []))
                dst.append(np.arange(ks, ks + s.num_past, dtype=np.int64))
                src.append(np.arange(row, row + s.num_past, dtype=np.int64))
            elif s.num_past:
                pool_rows[ks : ks + s.num_past] = w.plan.past_slots.numpy()[: s.num_past]
                any_pool = True
            key_rows.append(np.arange(ks + s.num_past, ks + s.length, dtype=np.int64))
            r0 = w.inputs.row0
            c_row = r0 + w.inputs.num_prefix_rows
            q_rows += [
                np.arange(r0, r0 + s.num_prefix_q, dtype=np.int64),
                np.arange(c_row + s.c0, c_row + s.c1, dtype=np.int64),
            ]
            cand_rows.append(np.arange(q_offsets[b] + s.num_prefix_q, q_offsets[b + 1], dtype=np.int64))
        targets = [s.c1 - s.c0 for s in seqs]
        if shape is not None:
            key_rows.append(np.arange(kv_offsets[-2] + shape.pad_past, kv_offsets[-1], dtype=np.int64))
            q_rows.append(np.zeros(shape.pad_queries, dtype=np.int64))
            targets.append(0)
            cand_rows.append(np.zeros(shape.candidates - sum(targets), dtype=np.int64))
        pieces = {
            "q_offsets": np.array(q_offsets, dtype=np.int64),
            "kv_offsets": np.array(kv_offsets, dtype=np.int64),
            "pool_rows": pool_rows,
            "key_rows": np.concatenate(key_rows),
            "q_rows": np.concatenate(q_rows),
        }
        if any(targets) or shape is not None:
            pieces["num_targets"] = np.array(targets, dtype=np.int64)
        if need_output:
            pieces["cand_rows"] = np.concatenate(cand_rows)
        for i, (_, dst, src) in enumerate(copies.values()):
            pieces[f"dst{i}"], pieces[f"src{i}"] = np.concatenate(dst), np.concatenate(src)
        if self.encoder.relative_bias is not None:
            n = shape.max_len if shape is not None else _eager_max_len(seqs)
            pieces.update(self._bias_pieces(seqs, n, shape))
        return pieces, kv_offsets, any_pool, copies

    def _encode(
        self,
        d: dict[str, torch.Tensor],
        x: torch.Tensor,
        rab_buffer: torch.Tensor | None,
        b: int,
        n: int,
        max_q: int,
        total_keys: int,
        need_output: bool,
        any_pool: bool,
        copies: dict,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Device side of a pass (no host sync, so it can be captured): the key buffers ``[L, keys, H, D]`` after
        every layer wrote its new rows, and the candidates' outputs (``need_output``)."""
        cache = self.cache
        if any_pool:
            k_all, v_all = select_rows(cache.k_pool, d["pool_rows"]), select_rows(cache.v_pool, d["pool_rows"])
        else:
            shape = (cache.num_layers, total_keys, cache.num_heads)
            k_all = torch.empty(*shape, cache.qk_dim, device=self.device, dtype=self.dtype)
            v_all = torch.empty(*shape, cache.v_dim, device=self.device, dtype=self.dtype)
        for i, ((k_src, v_src), _, _) in enumerate(copies.values()):
            copy_rows_(k_all, d[f"dst{i}"], select_rows(k_src, d[f"src{i}"]))
            copy_rows_(v_all, d[f"dst{i}"], select_rows(v_src, d[f"src{i}"]))
        rab = None if rab_buffer is None else self._pass_bias(d, rab_buffer, b, n)
        h = x.index_select(0, d["q_rows"])
        # The attention kernels take int32 offsets and target counts: converted once per pass, not once per layer
        # (8 layers: 21 fewer copy kernels in a cache hit's graph).
        q_offsets, kv_offsets = d["q_offsets"].to(torch.int32), d["kv_offsets"].to(torch.int32)
        num_targets = d["num_targets"].to(torch.int32) if "num_targets" in d else None
        blocks = self.encoder.blocks
        for layer, block in enumerate(blocks):
            y = block.forward_into_keys(
                h,
                q_offsets,
                k_all[layer],
                v_all[layer],
                kv_offsets,
                d["key_rows"],
                n,
                rab,
                num_targets=num_targets,
                contextual_seq_len=self.model.contextual_seq_len,
                max_q_len=max_q,
                need_output=need_output or layer < len(blocks) - 1,
                validate=False,  # offsets built here; the check would sync a GPU
            )
            if y is not None:
                h = y
        return k_all, v_all, (h.index_select(0, d["cand_rows"]) if need_output else None)

    def _bias_times(self, seqs: list[_Seq], n: int, shape: PassShape | None) -> tuple[np.ndarray, np.ndarray]:
        """The time pieces of ``_bias_pieces``, ``key_times`` and ``q_time`` (the data of a pass's bias; its other
        pieces depend only on the pass's layout)."""
        key_times = np.zeros((len(seqs) + (shape is not None), n), dtype=np.int64)
        q_time = []
        for b, s in enumerate(seqs):
            inp, m = s.work.inputs, s.c1 - s.c0
            p = inp.prefix_len
            cand_t = inp.candidate_times.numpy()[s.c0 : s.c1]
            key_times[b, :p] = inp.prefix_key_times.numpy()
            key_times[b, p : p + m] = cand_t
            q_time += [inp.query_times.numpy()[inp.num_prefix_rows - s.num_prefix_q :], cand_t]
        if shape is not None:
            q_time.append(np.zeros(shape.pad_queries, dtype=np.int64))
        return key_times.reshape(-1), np.concatenate(q_time)

    def _bias_pieces(self, seqs: list[_Seq], n: int, shape: PassShape | None) -> dict[str, np.ndarray]:
        """Host side of ``_pass_bias`` (int64 NumPy): per query row its sequence, row in the flattened ``[B * N, N]``
        bias, query time and position and its sequence's prefix length; per sequence the key times padded to ``N``
        (the padding sequence's all zero, its query rows its own bias rows)."""
        key_times, q_time = self._bias_times(seqs, n, shape)
        seq_of, rab_row, q_pos, prefix_len = [], [], [], []
        for b, s in enumerate(seqs):
            nq, m, p = s.num_q, s.c1 - s.c0, s.work.inputs.prefix_len
            seq_of.append(np.full(nq, b, dtype=np.int64))
            rab_row.append(np.arange(b * n + s.num_past, b * n + s.length, dtype=np.int64))
            q_pos += [np.arange(p - s.num_prefix_q, p, dtype=np.int64), np.full(m, p, dtype=np.int64)]
            prefix_len.append(np.full(nq, p, dtype=np.int64))
        if shape is not None:
            b, pad = len(seqs), shape.pad_queries
            seq_of.append(np.full(pad, b, dtype=np.int64))
            rab_row.append(np.arange(b * n + shape.pad_past, b * n + shape.pad_past + pad, dtype=np.int64))
            zeros = np.zeros(pad, dtype=np.int64)
            q_pos.append(zeros)
            prefix_len.append(zeros)
        return {
            "key_times": key_times,
            "seq_of": np.concatenate(seq_of),
            "rab_row": np.concatenate(rab_row),
            "q_time": q_time,
            "q_pos": np.concatenate(q_pos),
            "prefix_len": np.concatenate(prefix_len),
        }

    def _shared_rab_buffer(self, b: int, n: int) -> torch.Tensor | None:
        """The eager passes' flat, zero-initialised bias buffer, grown to hold ``[b * n, n]``."""
        if self.encoder.relative_bias is None:
            return None
        need = b * n * n
        if self._rab_buffer is None or self._rab_buffer.numel() < need:
            size = max(need, self.model.config.max_seq_len**2)
            self._rab_buffer = torch.zeros(size, device=self.device, dtype=self.dtype)
        return self._rab_buffer

    def _pass_bias(self, d: dict[str, torch.Tensor], buffer: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """The pass's bias rows in the op's delta-q layout ``[B, 1, N, N]`` (row = query position), all query rows in
        one call. Keys: prefix row ``j`` at position ``j``, the candidates at ``P``. Only the query rows are read,
        so they are written into a reused flat buffer rather than a fresh square per pass: rows left from earlier
        passes are finite and fall on masked or unread entries."""
        rab = buffer[: b * n * n].view(b * n, n)
        key_times = d["key_times"].view(b, n).index_select(0, d["seq_of"])
        key_pos = torch.arange(n, device=self.device).view(1, n).minimum(d["prefix_len"].view(-1, 1))
        rows = relative_bias_rows(self.encoder.relative_bias, key_times, key_pos, d["q_time"], d["q_pos"])
        return rab.index_copy_(0, d["rab_row"], rows).view(b, 1, n, n)
