"""Analyses of GEM: clustering dynamics, Lipschitz constants, per-layer localisation, calibration."""

from gem_jax.analysis.calibration import CalibrationResult, adaptive_temperatures, calibrate, class_prototypes
from gem_jax.analysis.clustering import (COS_THRESHOLD, ClusteringGrid, cluster_labels, clustering_grid,
                                         count_clusters, iterate_self_self, random_token_set, tokens_at_layer)
from gem_jax.analysis.lipschitz import PAPER_LIPSCHITZ, LipschitzReport, lipschitz_constants, spectral_norm
from gem_jax.analysis.localization import (LocalizationMetrics, as_pixels, default_paths, layer_tokens,
                                           localization_metrics, method_paths, method_tokens,
                                           object_background_contrast, patch_similarity,
                                           text_object_background_contrast, toy_scenes, visual_tower)

__all__ = [
    "COS_THRESHOLD",
    "CalibrationResult",
    "ClusteringGrid",
    "LipschitzReport",
    "LocalizationMetrics",
    "PAPER_LIPSCHITZ",
    "adaptive_temperatures",
    "as_pixels",
    "calibrate",
    "class_prototypes",
    "cluster_labels",
    "clustering_grid",
    "count_clusters",
    "default_paths",
    "iterate_self_self",
    "layer_tokens",
    "lipschitz_constants",
    "localization_metrics",
    "method_paths",
    "method_tokens",
    "object_background_contrast",
    "patch_similarity",
    "random_token_set",
    "spectral_norm",
    "text_object_background_contrast",
    "tokens_at_layer",
    "toy_scenes",
    "visual_tower",
]
