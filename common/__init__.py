"""Shared core of the SageAttention reproductions: quantizers, smoothing, the exact reference
attention, accuracy metrics, input checks and layouts, timing and synthetic inputs."""

from .checks import AttentionShape, check_attention_inputs, resolve_backend, resolve_sm_scale
from .metrics import Accuracy, accuracy, cosine_similarity, max_abs_error, relative_l1, rmse
from .reference import attention_reference

__all__ = [
    "Accuracy", "AttentionShape", "accuracy", "attention_reference", "check_attention_inputs",
    "cosine_similarity", "max_abs_error", "relative_l1", "resolve_backend", "resolve_sm_scale", "rmse",
]
