"""``DynamicEmbeddingCollection``: TorchRec's ``EmbeddingCollection`` interface over dynamic tables.

Takes a ``KeyedJaggedTensor`` and returns ``dict[feature_name, JaggedTensor]`` (one embedding per id, lengths and
offsets of the input kept), like ``torchrec.EmbeddingCollection``, so a model can swap a static table for a
dynamic one without touching the code that consumes the lookups. Several features may share one table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import JaggedTensor, KeyedJaggedTensor

from gr_dynemb.embedding import DynamicEmbedding, DynamicEmbeddingConfig
from gr_dynemb.grouped import lookup_tables


@dataclass
class DynamicTable:
    """One table of a collection: its name, the KJT features it serves, and its configuration."""

    name: str
    feature_names: list[str]
    config: DynamicEmbeddingConfig

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"table name must be an identifier, got {self.name!r}")
        if not self.feature_names:
            raise ValueError(f"table {self.name!r} serves no feature")


class DynamicEmbeddingCollection(nn.Module):
    def __init__(self, tables: list[DynamicTable]) -> None:
        super().__init__()
        if len({t.name for t in tables}) != len(tables):
            raise ValueError(f"table names must be unique, got {[t.name for t in tables]}")
        # Registered as submodules "table_<name>" (a bare name such as "items" would clash with nn.Module/ModuleDict
        # attributes); table(name) looks them up.
        self._tables: dict[str, DynamicEmbedding] = {}
        for t in tables:
            self._tables[t.name] = DynamicEmbedding(t.config)
            self.add_module(f"table_{t.name}", self._tables[t.name])
        self._table_of: dict[str, str] = {}
        for t in tables:
            for f in t.feature_names:
                if f in self._table_of:
                    raise ValueError(f"feature {f!r} is served by both {self._table_of[f]!r} and {t.name!r}")
                self._table_of[f] = t.name

    def table(self, name: str) -> DynamicEmbedding:
        try:
            return self._tables[name]
        except KeyError:
            raise KeyError(f"no table {name!r} (tables: {list(self._tables)})") from None

    @property
    def feature_names(self) -> list[str]:
        return list(self._table_of)

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        names: list[str] = features.keys()  # a KJT's feature names (a method, not a dict view)
        unknown = [k for k in names if k not in self._table_of]
        if unknown:
            raise KeyError(f"features {unknown} have no table (served: {self.feature_names})")
        # One lookup per table (its features' ids concatenated): a shared table then takes one optimizer step per
        # backward, as a sharded collection does, whatever the number of features it serves. Training tables that
        # share devices and dim are looked up together (gr_dynemb.grouped): one de-duplication, one host
        # synchronisation and one gradient aggregation for all of them.
        jts = features.to_dict()
        by_table: dict[str, list[str]] = {}
        for name in names:
            by_table.setdefault(self._table_of[name], []).append(name)
        tables = list(by_table)
        looked_up = lookup_tables(
            [self._tables[t] for t in tables], [_concat([jts[f].values() for f in by_table[t]]) for t in tables]
        )
        rows = dict(zip(tables, looked_up, strict=True))
        embs: dict[str, torch.Tensor] = {}
        for table, feats in by_table.items():
            for f, emb in zip(feats, rows[table].split([jts[f].values().numel() for f in feats]), strict=True):
                embs[f] = emb
        return {f: JaggedTensor(values=embs[f], lengths=jts[f].lengths(), offsets=jts[f].offsets()) for f in names}


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
