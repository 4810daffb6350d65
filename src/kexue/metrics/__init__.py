"""Metrics: classification (accuracy, NLL, ECE, linearity gap) and retrieval (top-k, recall@k, mAP@R)."""
