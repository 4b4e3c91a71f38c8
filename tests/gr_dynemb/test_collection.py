"""DynamicEmbeddingCollection: TorchRec's EmbeddingCollection interface (KJT in, dict of JaggedTensor out)."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from gr_dynemb import (
    DynamicEmbeddingCollection,
    DynamicEmbeddingConfig,
    DynamicTable,
    DynamicTableConfig,
    FusedOptimizerConfig,
)


def collection() -> DynamicEmbeddingCollection:
    def cfg(dim: int) -> DynamicEmbeddingConfig:
        return DynamicEmbeddingConfig(DynamicTableConfig(dim=dim, capacity=256), FusedOptimizerConfig("sgd", lr=0.5))

    return DynamicEmbeddingCollection(
        [DynamicTable("items", ["item", "clicked_item"], cfg(4)), DynamicTable("users", ["user"], cfg(3))]
    )


def test_lookup_keeps_the_jagged_structure_and_shares_tables() -> None:
    ec = collection()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item", "clicked_item", "user"],
        values=torch.tensor([7, 2**50, 7, 7, -3, 11]),
        lengths=torch.tensor([2, 0, 1, 2, 1, 0]),  # batch of 2: item [2, 0]; clicked_item [1, 2]; user [1, 0]
    )
    out = ec(kjt)
    assert list(out) == ["item", "clicked_item", "user"]
    assert out["item"].lengths().tolist() == [2, 0] and out["clicked_item"].lengths().tolist() == [1, 2]
    assert out["item"].values().shape == (2, 4) and out["user"].values().shape == (1, 3)
    assert out["user"].lengths().tolist() == [1, 0]
    # id 7 reads the same row through both features of the shared table.
    torch.testing.assert_close(out["item"].values()[0], out["clicked_item"].values()[0])
    assert ec.table("items").table.size() == 3 and ec.table("users").table.size() == 1
    # Training through the collection updates the shared row once per backward, with both features' gradients.
    before = out["item"].values()[0].detach().clone()
    (out["item"].values().sum() + out["clicked_item"].values().sum()).backward()
    after, _ = ec.table("items").table.find(torch.tensor([7]))
    torch.testing.assert_close(after[0, :4], before - 0.5 * 3)  # id 7 appears 3 times across the two features


def test_bad_configuration_and_unknown_features() -> None:
    ec = collection()
    with pytest.raises(KeyError, match="have no table"):
        ec(KeyedJaggedTensor.from_lengths_sync(keys=["movie"], values=torch.tensor([1]), lengths=torch.tensor([1])))
    cfg = DynamicEmbeddingConfig(DynamicTableConfig(dim=2))
    with pytest.raises(ValueError, match="served by both"):
        DynamicEmbeddingCollection([DynamicTable("a", ["f"], cfg), DynamicTable("b", ["f"], cfg)])
    with pytest.raises(ValueError, match="unique"):
        DynamicEmbeddingCollection([DynamicTable("a", ["f"], cfg), DynamicTable("a", ["g"], cfg)])
