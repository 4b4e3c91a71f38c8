"""SASRec (Kang & McAuley, 2018): causal softmax self-attention + FFN, the standard baseline for HSTU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gr_models.jagged import jagged_to_padded, padded_to_jagged


@dataclass
class SASRecConfig:
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    ffn_dim: int | None = None  # None: embedding_dim, as in the original SASRec
    max_seq_len: int = 200
    dropout: float = 0.2
    attn_dropout: float = 0.0
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "num_blocks", "num_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SASRecConfig.{name} must be positive, got {getattr(self, name)}")
        if self.embedding_dim % self.num_heads:
            raise ValueError(f"embedding_dim {self.embedding_dim} is not divisible by num_heads {self.num_heads}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"SASRecConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def ffn_hidden_dim(self) -> int:
        return self.ffn_dim or self.embedding_dim


class SASRecBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))`` then ``x + FFN(LN(x))``, causal attention."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        d = config.embedding_dim
        self.config = config
        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(d, config.ffn_hidden_dim),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.ffn_hidden_dim, d),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """``x``: padded ``[B, N, D]``; ``attn_mask``: bool ``[B, 1, N, N]`` (True = may attend)."""
        b, n, d = x.shape
        h = self.config.num_heads
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.config.attn_dropout if self.training else 0.0
        )
        x = x + self.dropout(self.attn_out(attn.transpose(1, 2).reshape(b, n, d)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SASRecEncoder(nn.Module):
    """Jagged-in, jagged-out SASRec encoder; pads only inside, for the attention matmuls."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        timestamps: torch.Tensor | None = None,
        query_timestamps: torch.Tensor | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        # SASRec uses positions only, and padding reads no offsets on the host (``validate``: HSTUEncoder's interface).
        del timestamps, query_timestamps, validate
        n = max_seq_len
        lengths = seq_offsets[1:] - seq_offsets[:-1]
        idx = torch.arange(n, device=x.device)
        causal = idx.view(1, n) <= idx.view(n, 1)
        key_valid = idx.view(1, 1, n) < lengths.view(-1, 1, 1)
        # The diagonal stays allowed even on padded rows, so no row is fully masked (which would give NaNs).
        mask = (causal & key_valid) | torch.eye(n, dtype=torch.bool, device=x.device)
        h = jagged_to_padded(x, seq_offsets, n)
        for block in self.blocks:
            h = block(h, mask.unsqueeze(1))
        return padded_to_jagged(self.final_norm(h), seq_offsets)
