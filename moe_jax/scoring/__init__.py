"""Calibration statistics for pruning: one pass over data, many statistics (see `collect`)."""

from moe_jax.scoring.calibration import calibration_batches, calibration_batches_from_config
from moe_jax.scoring.collect import calibration_rows, collect, model_digest
from moe_jax.scoring.layerwise import LAYERWISE_STATISTICS, collect_layerwise
from moe_jax.scoring.statistics import (
    DIM_STATISTICS,
    EXPERT_STATISTICS,
    STATISTICS,
    Scores,
    ScoringError,
    magnitude,
    random_scores,
)

__all__ = ["collect", "calibration_batches", "calibration_batches_from_config", "calibration_rows", "Scores",
           "ScoringError", "STATISTICS", "DIM_STATISTICS", "EXPERT_STATISTICS", "magnitude", "random_scores",
           "model_digest", "collect_layerwise", "LAYERWISE_STATISTICS"]
