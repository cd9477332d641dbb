"""Dynamic expert trimming: per-token thresholds after top-k, calibrated to an active-parameter target.

`TrimmingPolicy.masks(cfg, params)` turns a policy into `forward`/`generate`/`evaluate` masks
(checking the frozen-router fingerprint first); `calibrate` chooses tau on calibration data;
`measure` reports the loss and the active routed-expert parameter fraction of any masks.
The per-token rule itself is `moe_jax.model.moe.trim`.
"""

from moe_jax.trimming.calibrate import MODES, TrimStats, calibrate, expert_param_counts, measure
from moe_jax.trimming.policy import (
    FILENAME,
    LayerTrim,
    RouterDriftError,
    TrimmingError,
    TrimmingPolicy,
    router_fingerprint,
)

__all__ = ["FILENAME", "MODES", "LayerTrim", "RouterDriftError", "TrimStats", "TrimmingError", "TrimmingPolicy",
           "calibrate", "expert_param_counts", "measure", "router_fingerprint"]
