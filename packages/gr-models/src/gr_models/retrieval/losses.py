"""Sampled softmax for next-item prediction: the positive against K negatives, cosine logits / temperature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gr_models.retrieval.gathered_logits import in_batch_logits


class SampledSoftmaxLoss(nn.Module):
    """``-log softmax([s(q, pos), s(q, neg_1..K)])[0]`` averaged over positions, ``s = <q, e> / temperature``.

    Negatives per position are drawn on the targets' device by a generator that one draw of the torch default
    (host) generator seeds per call (``draw_ids``), so seeding and checkpointed RNG state make runs reproducible and
    processes in the same RNG state draw the same ids:

    - ``"uniform"``: uniformly over the whole catalogue (the HSTU paper's choice);
    - ``"in_batch"``: uniformly over the target items of the current batch, i.e. proportional to in-batch
      popularity (cheap, harder negatives; no logQ correction).

    A negative equal to the position's positive is masked out (an "accidental hit"), never counted as negative.

    In-batch negatives are rows of the targets' own embeddings: the loss draws their positions in the batch and
    gathers them from the target embeddings (``target_embeddings`` when the caller has them, else one lookup of the
    targets), so the table is not looked up for them at all; values, draws and gradients equal looking the drawn ids
    up. A subclass that overrides ``sample_negatives`` (e.g. drawing over a larger batch than this one's targets) gets
    its ids looked up through ``item_embeddings`` instead.
    """

    def __init__(
        self,
        num_items: int,
        num_negatives: int = 128,
        temperature: float = 0.05,
        negatives: Literal["uniform", "in_batch"] = "uniform",
    ) -> None:
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if negatives not in ("uniform", "in_batch"):
            raise ValueError(f"negatives must be 'uniform' or 'in_batch', got {negatives!r}")
        self.num_items = num_items
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.negatives = negatives
        self._generators: dict[torch.device, torch.Generator] = {}

    def draw_ids(self, high: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``randint(high, shape)`` made on ``device`` by a generator seeded with one draw of the default (host)
        torch generator. The host pays one number however large the draw: drawing ``[65k, 32]`` on the host took 12
        ms here and 22 ms on the H200 machine's host (profiler), every step of ``tools/bench_parallel.py``. The
        default CUDA generator is left alone (dropout on a data-parallel rank's share advances it differently than
        one process does), so processes in the same host RNG state draw the same ids: data-parallel ranks drawing a
        global batch's negatives train what one process trains."""
        seed = int(torch.randint(0, 2**62, (1,)))
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(seed)
        return torch.randint(high, shape, generator=generator, device=device)

    def sample_negative_positions(self, targets: torch.Tensor) -> torch.Tensor:
        """In-batch negatives as positions into ``targets``: ``[N, K]`` (the draw ``sample_negatives`` makes)."""
        return self.draw_ids(targets.numel(), (targets.numel(), self.num_negatives), targets.device)

    def sample_negatives(self, targets: torch.Tensor) -> torch.Tensor:
        """Negative item ids ``[N, K]``."""
        if self.negatives == "uniform":
            return self.draw_ids(self.num_items, (targets.numel(), self.num_negatives), targets.device)
        return targets[self.sample_negative_positions(targets)]

    def gathers_in_batch(self) -> bool:
        """Whether in-batch negatives are gathered from the target embeddings (this class's own draw)."""
        return self.negatives == "in_batch" and type(self).sample_negatives is SampledSoftmaxLoss.sample_negatives

    def forward(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        item_embeddings: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        target_embeddings: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
        negative_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``queries``: normalised ``[N, D]``; ``targets``: item ids ``[N]``; ``item_embeddings``: ids -> normalised
        embeddings (any shape). What the caller looked up already (e.g. ``RetrievalModel.training_forward``, all in
        one table call): ``target_embeddings`` ``[N, D]``, and ``negatives`` (ids ``[N, K]`` drawn beforehand with
        ``sample_negatives``) with their ``negative_embeddings`` ``[N, K, D]``. In-batch negatives need nothing but
        the targets' embeddings; drawn here, uniform ones need ``item_embeddings``."""
        if targets.numel() == 0:
            raise ValueError("SampledSoftmaxLoss got an empty batch (no target positions)")
        given = negatives is not None
        if given != (negative_embeddings is not None):
            raise ValueError("negatives and negative_embeddings come together (ids and their embeddings)")
        needs_lookup = target_embeddings is None or (not given and not self.gathers_in_batch())
        if item_embeddings is None and needs_lookup:
            raise ValueError(
                f"SampledSoftmaxLoss with {self.negatives!r} negatives"
                + (" drawn by a subclass" if self.negatives == "in_batch" else "")
                + " needs item_embeddings (ids -> embeddings) to look them up, or negatives= with "
                "negative_embeddings="
            )
        if target_embeddings is None:
            target_embeddings = item_embeddings(targets)  # type: ignore[misc]
        elif target_embeddings.shape != queries.shape:
            raise ValueError(
                f"target_embeddings {tuple(target_embeddings.shape)} must match queries {tuple(queries.shape)}"
            )
        if not given and self.gathers_in_batch():
            positions = self.sample_negative_positions(targets)
            negatives = targets[positions]
            # The positive is the query's own target row: one gather of 1 + K rows scores it with the negatives,
            # from the same operands (under autocast, the same bf16 rows). A separate fp32 product for it cost the
            # H200 training step of tools/bench_parallel.py ~0.4 ms of kernels (its multiply and sum, their
            # backward, and the two [N, D] fp32 gradient sums it adds), against ~0.17 ms more of gathering.
            own = torch.arange(targets.numel(), device=positions.device).unsqueeze(1)
            # fp32 logits into the softmax, as when the fp32 positive promoted the concatenation.
            scored = in_batch_logits(queries, target_embeddings, torch.cat([own, positions], dim=1)).float()
            return self._cross_entropy(scored[:, :1], scored[:, 1:], negatives, targets)
        # fp32 products (embeddings may come in autocast's bf16: RetrievalModel.training_forward).
        pos_logits = (queries.float() * target_embeddings.float()).sum(-1, keepdim=True)
        if given:
            n, d = queries.shape
            if negatives.dim() != 2 or negatives.size(0) != n or negative_embeddings.shape != (n, negatives.size(1), d):  # type: ignore[union-attr]
                raise ValueError(
                    f"negatives must be [{n}, K] with negative_embeddings [{n}, K, {d}], got "
                    f"{tuple(negatives.shape)} and {tuple(negative_embeddings.shape)}"  # type: ignore[union-attr]
                )
            neg_logits = torch.einsum("nd,nkd->nk", queries, negative_embeddings)
        else:
            negatives = self.sample_negatives(targets)
            neg_logits = self._looked_up_logits(queries, negatives, item_embeddings)  # type: ignore[arg-type]
        return self._cross_entropy(pos_logits, neg_logits, negatives, targets)

    def _cross_entropy(
        self, pos_logits: torch.Tensor, neg_logits: torch.Tensor, negatives: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The loss from the positives' ``[N, 1]`` and the negatives' ``[N, K]`` dot products, accidental hits (a
        negative id equal to its position's target) masked out."""
        neg_logits = neg_logits.masked_fill(negatives == targets.unsqueeze(1), float("-inf"))
        logits = torch.cat([pos_logits, neg_logits], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros_like(targets))

    def _looked_up_logits(
        self, queries: torch.Tensor, negatives: torch.Tensor, item_embeddings: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        if self.num_items <= self.num_negatives * queries.size(-1):
            # Small catalogue: scoring every item once and gathering is cheaper than gathering [N, K, D] rows.
            all_logits = queries @ item_embeddings(torch.arange(self.num_items, device=negatives.device)).T
            return all_logits.gather(1, negatives)
        return torch.einsum("nd,nkd->nk", queries, item_embeddings(negatives))
