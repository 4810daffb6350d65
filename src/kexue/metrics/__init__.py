"""Metrics: classification (accuracy, NLL, expected calibration error, mixup's linearity gap), retrieval
(top-k accuracy, recall@k, mAP@R on cosine similarity, chunked), generative (Fréchet distance, KID,
precision/recall, an Inception-Score analogue, the checkerboard score; offline feature extractors), see
:mod:`kexue.metrics.generative`, and text generation (ROUGE, BLEU; ``kexue[bert]``), see :mod:`kexue.metrics.text`.

>>> import torch
>>> from kexue.metrics import accuracy
>>> accuracy(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
0.5
"""

from .classification import (
    accuracy,
    evaluate_classifier,
    expected_calibration_error,
    linearity_gap,
    nll,
    predict_logits,
)
from .generative import (
    FeatureExtractor,
    checkerboard_score,
    extract_features,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)
from .retrieval import map_at_r, recall_at_k, retrieval_metrics, retrieval_topk
from .text import bleu, rouge, text_metrics

__all__ = [
    "FeatureExtractor", "checkerboard_score", "extract_features", "fid_from_features", "frechet_distance",
    "inception_score", "kid", "precision_recall",
    "accuracy", "bleu", "evaluate_classifier", "expected_calibration_error", "linearity_gap", "map_at_r", "nll",
    "predict_logits", "recall_at_k", "retrieval_metrics", "retrieval_topk", "rouge", "text_metrics",
]
