"""HSTU: the Hierarchical Sequential Transduction Unit encoder ("Actions Speak Louder than Words", ICML 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import gr_kernels
from gr_kernels.hstu_attention import check_attention_values
from gr_models.modules.encoder_graphs import EncoderGraphs
from gr_models.modules.norm_mul import layer_norm_mul, layer_norm_residual, runs_fused
from gr_models.modules.relative_bias import RelativeBucketedTimeAndPositionBias, aligned_bias_len
from gr_models.modules.residual_linear import fuses as output_fuses
from gr_models.modules.residual_linear import residual_linear
from gr_models.modules.silu_projection import fuses as projection_fuses
from gr_models.modules.silu_projection import linear_silu_split


@dataclass
class HSTUConfig:
    """Shape and regularisation of an HSTU encoder.

    ``attention_dim``/``hidden_dim`` are per head (Q/K and U/V widths); ``None`` means ``embedding_dim //
    num_heads``. ``alpha`` scales ``QK^T + rab`` before the SiLU; ``None`` means ``1/sqrt(attention_dim)``.
    The attention output is divided by ``max_seq_len`` (the model's, not the batch's), so the scale does not
    change with the batch composition.
    """

    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    attention_dim: int | None = None
    hidden_dim: int | None = None
    max_seq_len: int = 200
    dropout: float = 0.2
    attn_dropout: float = 0.0
    alpha: float | None = None
    causal: bool = True
    max_attn_len: int = 0
    use_rab: bool = True
    num_time_buckets: int = 128
    layer_norm_eps: float = 1e-6
    attention_backend: str = "auto"
    # The block's two LayerNorms as fused ops on CUDA (gr_models.modules.norm_mul: Triton, fp32 inside, results in
    # the autocast dtype the projections read): the input norm, and U * LayerNorm(attn) in one pass. 17% off an
    # H200 training step (gr-models README). Other devices, exported programs and False: eager nn.LayerNorm.
    fused_norms: bool = True
    # The U/V/Q/K projection's backward as one Triton pass on CUDA (gr_models.modules.silu_projection): the SiLU's
    # gradient read from the four pieces' gradients in place (no concatenation) with the bias gradient summed in
    # the same pass. The fused path reads uvqk's weight and bias directly: forward hooks on block.uvqk do not run
    # there (as with fused_norms and the LayerNorms). Other devices, compiled and exported code, and False: the
    # eager form through the module.
    fused_projection: bool = True
    # The output projection and the residual add as one op (gr_models.modules.residual_linear): one matmul and one
    # Triton pass x + y W^T + b, and in the backward one pass for the gradient's cast and the bias gradient; with
    # fused_norms, the input norm's backward kernel also adds the residual's gradient to its own (no autograd add).
    # CUDA, eager, and no active dropout on the block output only; forward hooks on block.output do not run there.
    fused_residual: bool = True
    # Training forward and backward of the encoder replayed as CUDA graphs, one pair per bucket of padded row counts
    # (gr_models.modules.encoder_graphs: the host stops setting the pace of a GPU step). Eval, CPU, compiled code and
    # tensor-parallel blocks run eagerly. Needs attn_dropout == 0 (its seed is drawn on the host).
    cuda_graphs: bool = False
    cuda_graph_buckets: int = 32  # graphs kept per encoder (least recently used dropped)

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "num_blocks", "num_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HSTUConfig.{name} must be positive, got {getattr(self, name)}")
        if (self.attention_dim is None or self.hidden_dim is None) and self.embedding_dim % self.num_heads:
            raise ValueError(
                f"embedding_dim {self.embedding_dim} is not divisible by num_heads {self.num_heads}; "
                "set attention_dim and hidden_dim explicitly"
            )
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"HSTUConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.cuda_graphs and self.attn_dropout > 0.0:
            raise ValueError(
                "HSTUConfig.cuda_graphs needs attn_dropout == 0: the attention dropout draws its seed on the host, so "
                f"a graph would replay one mask (got attn_dropout={self.attn_dropout})"
            )
        if self.cuda_graph_buckets < 1:
            raise ValueError(f"HSTUConfig.cuda_graph_buckets must be >= 1, got {self.cuda_graph_buckets}")

    # Defaults are resolved on read, not stored: an owner (e.g. RetrievalModelConfig) may still change
    # embedding_dim after construction.
    @property
    def qk_dim(self) -> int:
        return self.attention_dim or self.embedding_dim // self.num_heads

    @property
    def v_dim(self) -> int:
        return self.hidden_dim or self.embedding_dim // self.num_heads

    @property
    def qk_scale(self) -> float:
        return self.alpha if self.alpha is not None else 1.0 / math.sqrt(self.qk_dim)


def block_norm(norm: nn.LayerNorm, x: torch.Tensor, u: torch.Tensor | None = None, *, fused: bool) -> torch.Tensor:
    """``norm(x)`` (times ``u``): the fused op when ``fused`` (``HSTUConfig.fused_norms``) and its kernels run on
    ``x``'s device, else eager; exported programs keep plain aten ops."""
    if fused and runs_fused(x) and not torch.compiler.is_exporting():
        return layer_norm_mul(x, u, norm.weight, norm.bias, norm.eps)
    return norm(x) if u is None else u * norm(x)


class HSTUBlock(nn.Module):
    """LayerNorm -> one projection to U, V, Q, K with SiLU -> HSTU attention (+rab) -> ``U * LayerNorm(attn)`` ->
    output projection -> dropout -> residual."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        h, dqk, dv = config.num_heads, config.qk_dim, config.v_dim
        self._split = [h * dv, h * dv, h * dqk, h * dqk]
        self.input_norm = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps)
        self.uvqk = nn.Linear(config.embedding_dim, sum(self._split))
        self.attn_norm = nn.LayerNorm(h * dv, eps=config.layer_norm_eps)
        self.output = nn.Linear(h * dv, config.embedding_dim)
        self.dropout = nn.Dropout(config.dropout)
        # Small init of the U/V/Q/K projection (std 0.02, as in the HSTU reference design): on MovieLens-100K it
        # converged much faster and higher than Xavier-uniform (std ~0.09 at 50 -> 200); see docs/results/ml-100k.md.
        nn.init.normal_(self.uvqk.weight, std=0.02)
        nn.init.zeros_(self.uvqk.bias)
        nn.init.xavier_uniform_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(
        self,
        x: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        rab: torch.Tensor | None,
        *,
        num_targets: torch.Tensor | None = None,
        contextual_seq_len: int = 0,
        validate: bool = True,
    ) -> torch.Tensor:
        """``num_targets``/``contextual_seq_len``: the attention op's target mask and contextual prefix (ranking).
        ``validate=False`` skips the op's value checks of the offsets (a device-to-host copy, so a sync on a GPU)."""
        u, v, q, k, x = self._project_and_residual(x)
        attn = self._attention(
            q,
            k,
            v,
            seq_offsets,
            max_seq_len,
            rab,
            num_targets=num_targets,
            contextual_seq_len=contextual_seq_len,
            validate=validate,
        )
        return self.finish(x, u, attn)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U [n, H * Dv]``, ``V [n, H, Dv]``, ``Q``, ``K [n, H, Dqk]`` of the layer inputs ``x [n, D]``."""
        return self._project_normed(self._norm(self.input_norm, x))

    def _project_and_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(*project(x), x)``: x again for the residual. Eagerly on CUDA with ``fused_norms`` and ``fused_residual``
        (and ``project`` not replaced, e.g. compiled), the input norm is ``layer_norm_residual``, so the residual's
        gradient is added inside the norm's backward kernel."""
        cfg = self.config
        if (
            cfg.fused_residual
            and cfg.fused_norms
            and runs_fused(x)
            and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
            and type(self).project is HSTUBlock.project
            and "project" not in self.__dict__
        ):
            norm = self.input_norm
            normed, x = layer_norm_residual(x, norm.weight, norm.bias, norm.eps)
            return (*self._project_normed(normed), x)
        return (*self.project(x), x)

    def _project_normed(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        h = cfg.num_heads
        if cfg.fused_projection and projection_fuses(normed, self.uvqk.weight):
            u, v, q, k = linear_silu_split(normed, self.uvqk.weight, self.uvqk.bias, self._split)
        else:  # through the module, so hooks on self.uvqk run wherever nothing is fused
            u, v, q, k = F.silu(self.uvqk(normed)).split(self._split, dim=-1)
        return u, v.reshape(-1, h, cfg.v_dim), q.reshape(-1, h, cfg.qk_dim), k.reshape(-1, h, cfg.qk_dim)

    def finish(self, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The block output of rows ``x`` from their ``U`` and attention output ``[n, H, Dv]``."""
        y = self._norm(self.attn_norm, attn.reshape(-1, self.config.num_heads * self.config.v_dim), u)
        dropout_off = not self.training or self.dropout.p == 0.0
        if self.config.fused_residual and dropout_off and output_fuses(x, y, self.output.weight):
            return residual_linear(x, y, self.output.weight, self.output.bias)
        return x + self.output(self.dropout(y))

    def _norm(self, norm: nn.LayerNorm, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        return block_norm(norm, x, u, fused=self.config.fused_norms)

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        rab: torch.Tensor | None,
        *,
        num_targets: torch.Tensor | None,
        contextual_seq_len: int,
        q_offsets: torch.Tensor | None = None,
        max_q_len: int | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        cfg = self.config
        return gr_kernels.hstu_attention(
            q,
            k,
            v,
            seq_offsets,
            max_seq_len,
            alpha=cfg.qk_scale,
            scaling_seqlen=cfg.max_seq_len,
            causal=cfg.causal,
            max_attn_len=cfg.max_attn_len,
            contextual_seq_len=contextual_seq_len,
            num_targets=num_targets,
            rab=rab,
            dropout_p=cfg.attn_dropout,
            training=self.training,
            backend=cfg.attention_backend,
            validate=validate,
            q_offsets=q_offsets,
            max_q_len=max_q_len,
        )

    def forward_with_past(
        self,
        x: torch.Tensor,
        q_offsets: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        past_offsets: torch.Tensor,
        max_seq_len: int,
        rab: torch.Tensor | None,
        *,
        num_targets: torch.Tensor | None = None,
        contextual_seq_len: int = 0,
        max_q_len: int | None = None,
        need_output: bool = True,
        validate: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The block on new rows ``x`` (jagged by ``q_offsets``) that extend cached sequences (``past_k``/``past_v``
        jagged by ``past_offsets``): sequence ``b`` is its past rows followed by its new rows, and the new rows are
        the attention op's queries (delta q; ``max_q_len`` bounds the new rows per sequence). Returns ``(output of
        the new rows or None, K, V of the new rows)``; ``need_output=False`` skips the attention (only the new rows'
        K/V are wanted, e.g. at the last layer). ``validate=False`` skips the op's value checks (a device sync on
        GPU) for callers that build the offsets themselves.

        Equal to ``forward`` on the whole sequences restricted to the new rows, given the past K/V that ``forward``
        would compute (the caller's job: a past row must not depend on the new rows)."""
        past_rows, key_rows = concat_rows(past_offsets, q_offsets, past_k.shape[0], x.shape[0])
        k_all = past_k.new_empty((past_k.shape[0] + x.shape[0], *past_k.shape[1:])).index_copy_(0, past_rows, past_k)
        v_all = past_v.new_empty((past_v.shape[0] + x.shape[0], *past_v.shape[1:])).index_copy_(0, past_rows, past_v)
        y = self.forward_into_keys(
            x,
            q_offsets,
            k_all,
            v_all,
            past_offsets + q_offsets,
            key_rows,
            max_seq_len,
            rab,
            num_targets=num_targets,
            contextual_seq_len=contextual_seq_len,
            max_q_len=max_q_len,
            need_output=need_output,
            validate=validate,
        )
        return y, k_all[key_rows], v_all[key_rows]

    def forward_into_keys(
        self,
        x: torch.Tensor,
        q_offsets: torch.Tensor,
        k_all: torch.Tensor,
        v_all: torch.Tensor,
        kv_offsets: torch.Tensor,
        key_rows: torch.Tensor,
        max_seq_len: int,
        rab: torch.Tensor | None,
        *,
        num_targets: torch.Tensor | None = None,
        contextual_seq_len: int = 0,
        max_q_len: int | None = None,
        need_output: bool = True,
        validate: bool = True,
    ) -> torch.Tensor | None:
        """``forward_with_past`` with the keys laid out by the caller: ``k_all``/``v_all`` (jagged by
        ``kv_offsets``) hold every sequence's past rows followed by room for its new rows; the new rows' K/V are
        written into rows ``key_rows`` (one per row of ``x``: each sequence's last rows) and the new rows attend.
        Saves the per-call jagged concatenation when one key buffer serves every layer of a pass. Returns the new
        rows' outputs (None with ``need_output=False``: only their K/V are written)."""
        u, v, q, k = self.project(x)
        k_all.index_copy_(0, key_rows, k)
        v_all.index_copy_(0, key_rows, v)
        if not need_output:
            return None
        attn = self._attention(
            q,
            k_all,
            v_all,
            kv_offsets,
            max_seq_len,
            rab,
            num_targets=num_targets,
            contextual_seq_len=contextual_seq_len,
            q_offsets=q_offsets,
            max_q_len=max_q_len,
            validate=validate,
        )
        return self.finish(x, u, attn)


def kernel_index(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Offsets or target counts ``t`` for every block's attention over the rows ``x``: int32 on CUDA (where the
    native and Triton kernels read int32, so each block's op, forward and backward, would otherwise convert them
    again: 16 small casts and their launches per 8-block training step); as given elsewhere (the PyTorch reference
    indexes with int64) and when the row count does not fit int32 (int32 offsets could not hold it)."""
    if t is None or not x.is_cuda or t.dtype != torch.int64 or x.shape[0] >= 2**31:
        return t
    return t.to(torch.int32)


def concat_rows(
    a_offsets: torch.Tensor, b_offsets: torch.Tensor, a_total: int, b_total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the rows of jagged ``a`` and ``b`` (same number of sequences) land when each sequence's ``a`` rows are
    followed by its ``b`` rows: ``(a_dst [a_total], b_dst [b_total])`` row indices into the concatenation."""
    device = a_offsets.device
    if a_offsets.numel() == 2:  # one sequence: a plain concatenation
        return torch.arange(a_total, device=device), torch.arange(a_total, a_total + b_total, device=device)
    a_len = a_offsets[1:] - a_offsets[:-1]
    b_len = b_offsets[1:] - b_offsets[:-1]
    out_offsets = a_offsets + b_offsets
    a_dst = torch.arange(a_total, device=device) + torch.repeat_interleave(b_offsets[:-1], a_len, output_size=a_total)
    b_dst = torch.arange(b_total, device=device) + torch.repeat_interleave(
        out_offsets[:-1] + a_len - b_offsets[:-1], b_len, output_size=b_total
    )
    return a_dst, b_dst


def concat_jagged(a: torch.Tensor, a_offsets: torch.Tensor, b: torch.Tensor, b_offsets: torch.Tensor) -> torch.Tensor:
    """Per sequence, rows of ``a`` then rows of ``b`` (both jagged over the same number of sequences)."""
    a_dst, b_dst = concat_rows(a_offsets, b_offsets, a.shape[0], b.shape[0])
    out = a.new_empty((a.shape[0] + b.shape[0], *a.shape[1:]))
    return out.index_copy_(0, a_dst, a).index_copy_(0, b_dst, b)


class HSTUEncoder(nn.Module):
    """A stack of HSTU blocks over jagged ``[total, D]`` inputs, sharing one relative attention bias module."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(HSTUBlock(config) for _ in range(config.num_blocks))
        self.relative_bias = (
            RelativeBucketedTimeAndPositionBias(config.max_seq_len, config.num_time_buckets) if config.use_rab else None
        )

    def forward(
        self,
        x: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        timestamps: torch.Tensor,
        query_timestamps: torch.Tensor,
        *,
        num_targets: torch.Tensor | None = None,
        contextual_seq_len: int = 0,
        positions: torch.Tensor | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        """``num_targets`` ([B]) marks the last tokens of each sequence as targets (each sees the history and
        itself only), ``contextual_seq_len`` the first tokens as a fully visible prefix; ``positions`` (jagged
        ``[total]``) replaces the token index in the relative bias, e.g. to give all targets one position.
        ``validate=False`` skips the attention op's value check of the offsets (a device sync on a GPU), for
        offsets already checked on the host (``SequenceBatch.offsets_checked``).

        With ``HSTUConfig.cuda_graphs``, training calls on CUDA replay CUDA graphs (``encoder_graphs``); the output
        is then a view of a buffer that the next graphed call overwrites."""
        graphs = self._graphs()
        if graphs is not None:
            reason = graphs.eager_reason(self, x)
            if reason is None:
                if validate:
                    check_attention_values(x, x, seq_offsets, max_seq_len, num_targets, None, 0)
                return graphs.run(
                    self, x, seq_offsets, max_seq_len, timestamps, query_timestamps, num_targets,
                    contextual_seq_len, positions,
                )  # fmt: skip
            graphs.note(reason)
        return self.encode(
            x,
            seq_offsets,
            max_seq_len,
            timestamps,
            query_timestamps,
            num_targets=num_targets,
            contextual_seq_len=contextual_seq_len,
            positions=positions,
            validate=validate,
        )

    def encode(
        self,
        x: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        timestamps: torch.Tensor,
        query_timestamps: torch.Tensor,
        *,
        num_targets: torch.Tensor | None = None,
        contextual_seq_len: int = 0,
        positions: torch.Tensor | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        """``forward`` without CUDA graphs (what the graphs capture)."""
        rab = None
        if self.relative_bias is not None:
            max_seq_len = aligned_bias_len(max_seq_len, self.relative_bias.max_seq_len)
            rab = self.relative_bias(timestamps, query_timestamps, seq_offsets, max_seq_len, positions).to(x.dtype)
        # Every block sees the same offsets and targets: the op checks them (a host sync on a GPU) in the first only,
        # unless the caller checked them on the host.
        attn_offsets, attn_targets = kernel_index(seq_offsets, x), kernel_index(num_targets, x)
        for i, block in enumerate(self.blocks):
            x = block(
                x,
                attn_offsets,
                max_seq_len,
                rab,
                num_targets=attn_targets,
                contextual_seq_len=contextual_seq_len,
                validate=validate and i == 0,
            )
        return x

    def _graphs(self) -> EncoderGraphs | None:
        """The encoder's CUDA graphs (made on first use) when ``config.cuda_graphs``."""
        if not self.config.cuda_graphs:
            return None
        graphs = self.__dict__.get("_cuda_graphs")
        if graphs is None or graphs.graphs.limit != self.config.cuda_graph_buckets:
            graphs = self.__dict__["_cuda_graphs"] = EncoderGraphs(self.config.cuda_graph_buckets)
        return graphs
