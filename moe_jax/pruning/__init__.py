"""Pruning: plans (data), selection rules, and physical compaction.

    plan = pruning.select(cfg, scores, method="fisher", scope="global", ratio=0.5)
    masked_logits = model.forward(cfg, params, tokens, pruning.masks(cfg, plan))  # simulate
    cfg2, params2 = pruning.apply(cfg, params, plan)                               # compact
    plan = pruning.select(cfg, scores, method="pathfinder", scope="global", ratio=0.25)  # experts
"""

from moe_jax.pruning.compact import apply, pad_to_uniform, routed_bytes
from moe_jax.pruning.experts import ALLOCATIONS, EXPERT_METHODS, select_experts
from moe_jax.pruning.pathfinder import PathfinderSettings, k_best_paths
from moe_jax.pruning.plan import PlanError, PruningPlan, masks
from moe_jax.pruning.select import SCOPES, check_ratio, select

__all__ = ["PruningPlan", "PlanError", "select", "apply", "masks", "pad_to_uniform", "routed_bytes",
           "check_ratio", "SCOPES", "EXPERT_METHODS", "ALLOCATIONS", "select_experts",
           "PathfinderSettings", "k_best_paths"]
