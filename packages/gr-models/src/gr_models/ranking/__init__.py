"""HSTU ranking (history with actions, contextual user features, candidates as targets, multi-task heads), the
DLRM-style baseline, multi-task losses and ranking metrics (AUC, NE, GAUC, accuracy, MSE)."""

from gr_models.ranking.dlrm import DLRMConfig, DLRMRankingModel, pairwise_dots
from gr_models.ranking.features import ItemBagEmbedding, RankingFeatureSpec, UserFeatureEmbedding
from gr_models.ranking.hstu_ranking import HSTURankingConfig, HSTURankingModel
from gr_models.ranking.metrics import RankingMetrics, TaskSpec, binary_auc, group_auc, normalized_entropy
from gr_models.ranking.tasks import MultiTaskLoss, RankingTask, TaskHeads, check_tasks

__all__ = [
    "DLRMConfig",
    "DLRMRankingModel",
    "HSTURankingConfig",
    "HSTURankingModel",
    "ItemBagEmbedding",
    "MultiTaskLoss",
    "RankingFeatureSpec",
    "RankingMetrics",
    "RankingTask",
    "TaskHeads",
    "TaskSpec",
    "UserFeatureEmbedding",
    "binary_auc",
    "check_tasks",
    "group_auc",
    "normalized_entropy",
    "pairwise_dots",
]
