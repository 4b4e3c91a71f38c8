"""HSTU/SASRec retrieval: next-item model, sampled-softmax loss and full-ranking evaluation."""

from gr_models.retrieval.evaluation import evaluate_retrieval
from gr_models.retrieval.losses import SampledSoftmaxLoss
from gr_models.retrieval.metrics import RankingMetrics
from gr_models.retrieval.model import RetrievalModel, RetrievalModelConfig, TrainingEmbeddings, build_retrieval_model

__all__ = [
    "RankingMetrics",
    "RetrievalModel",
    "RetrievalModelConfig",
    "SampledSoftmaxLoss",
    "TrainingEmbeddings",
    "build_retrieval_model",
    "evaluate_retrieval",
]
