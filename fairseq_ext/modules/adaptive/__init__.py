"""Adaptive input embedding and projected adaptive log-softmax of Transformer-XL (shared vocabulary clusters)."""
from .adaptive_input import XLAdaptiveInput, cluster_bounds, cluster_dims
from .projected_adaptive_softmax import ProjectedAdaptiveLogSoftmax

__all__ = ["XLAdaptiveInput", "ProjectedAdaptiveLogSoftmax", "cluster_bounds", "cluster_dims"]
