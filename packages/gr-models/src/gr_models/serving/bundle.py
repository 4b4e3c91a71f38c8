"""Model bundle: one file with everything ``gr-serve`` needs to rebuild a trained ``HSTURankingModel``.

A bundle is a ``torch.save`` of a plain dict (read back with ``weights_only=True``: no code is unpickled)::

    {"format": "gr-models-ranking-bundle", "format_version": 1,
     "config": HSTURankingConfig as nested dicts (feature spec, tasks, HSTU shape, action mode, ...),
     "state_dict": the model's tensors, "model_version": str, "metadata": {str: str}}

Trainers write it next to their checkpoints (``examples/ranking`` writes ``<output.dir>/model_bundle.pt`` from the
best weights); nothing here depends on the trainer's own checkpoint format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gr_models.atomic_save import atomic_torch_save
from gr_models.inference.scorer import model_fingerprint
from gr_models.modules.hstu import HSTUConfig
from gr_models.ranking.features import RankingFeatureSpec
from gr_models.ranking.hstu_ranking import HSTURankingConfig, HSTURankingModel
from gr_models.ranking.tasks import RankingTask

BUNDLE_FORMAT = "gr-models-ranking-bundle"
BUNDLE_VERSION = 1


class BundleError(ValueError):
    """A file is not a readable model bundle (wrong format, version or contents)."""


@dataclass
class ModelBundle:
    model: HSTURankingModel  # in eval mode
    model_version: str
    metadata: dict[str, str]


def config_to_dict(config: HSTURankingConfig) -> dict[str, Any]:
    if config.dynamic_item_table is not None:
        raise BundleError(
            "a model with a gr-dynemb dynamic item table cannot be bundled (its rows live outside the state dict)"
        )
    return dataclasses.asdict(config)


def config_from_dict(d: dict[str, Any]) -> HSTURankingConfig:
    try:
        d = dict(d)
        feats = dict(d.pop("features"))
        feats["user_feature_names"] = tuple(feats["user_feature_names"])
        feats["user_feature_sizes"] = tuple(feats["user_feature_sizes"])
        tasks = [RankingTask(**t) for t in d.pop("tasks")]
        hstu = HSTUConfig(**d.pop("hstu"))
        if d.pop("dynamic_item_table", None) is not None:
            raise BundleError("bundles with a dynamic item table are not supported")
        return HSTURankingConfig(features=RankingFeatureSpec(**feats), tasks=tasks, hstu=hstu, **d)
    except (KeyError, TypeError) as exc:
        raise BundleError(f"bundle config is incomplete or has unknown fields: {exc}") from exc


def save_bundle(
    model: HSTURankingModel,
    path: str | Path,
    *,
    model_version: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Writes ``model`` (config + weights) to ``path`` atomically; ``model_version`` defaults to a hash of the
    weights. Returns the path."""
    if not isinstance(model, HSTURankingModel):
        raise TypeError(f"only HSTURankingModel can be bundled, got {type(model).__name__}")
    payload = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "config": config_to_dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_version": model_fingerprint(model) if model_version is None else str(model_version),
        "metadata": {str(k): str(v) for k, v in (metadata or {}).items()},
    }
    return atomic_torch_save(path, payload)


def load_bundle(path: str | Path) -> ModelBundle:
    """Rebuilds the model of a bundle on CPU, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model bundle not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of arbitrary objects, a truncated file, not a torch file at all
        raise BundleError(f"{path} is not a model bundle: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a {BUNDLE_FORMAT} file")
    if payload.get("format_version") != BUNDLE_VERSION:
        version = payload.get("format_version")
        raise BundleError(f"{path} has bundle format version {version}, expected {BUNDLE_VERSION}")
    model = HSTURankingModel(config_from_dict(payload["config"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise BundleError(f"{path}: weights do not fit the bundled config: {exc}") from exc
    return ModelBundle(model.eval(), str(payload["model_version"]), dict(payload.get("metadata", {})))
