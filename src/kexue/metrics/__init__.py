"""Metrics: classification (accuracy, NLL, expected calibration error, mixup's linearity gap), retrieval
(top-k accuracy, recall@k, mAP@R on cosine similarity, chunked) and text generation (ROUGE, BLEU; ``kexue[bert]``).

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
from .retrieval import map_at_r, recall_at_k, retrieval_metrics, retrieval_topk
from .text import bleu, rouge, text_metrics

__all__ = [
    "accuracy", "bleu", "evaluate_classifier", "expected_calibration_error", "linearity_gap", "map_at_r", "nll",
    "predict_logits", "recall_at_k", "retrieval_metrics", "retrieval_topk", "rouge", "text_metrics",
]
