"""Router safety: audit, route-forcing and input-side attacks, a routing monitor, safety-aware pruning.

    report = safety.audit(cfg, params, tokenizer, skills.eval_set("safety", 100))
    forced = safety.route_forcing(cfg, params, tokenizer, examples, candidates=8)
    reach = safety.reachability(cfg, params, tokenizer, prompts, {layer: [expert]}, method="gcg")
    monitor = safety.RoutingMonitor.fit(cfg, params, clean_rows, fpr=0.05)
    critical = safety.safety_critical(cfg, safety_scores)      # Fisher on the safety domain
    plan = pruning.select(cfg, safety.protect_scores(cfg, utility_scores, critical), "fisher", "global", 0.5)
"""

from moe_jax.safety.attacks import (
    AttackError,
    AttackResult,
    expert_silencing,
    forbidden_specificity,
    route_forcing,
    router_masking,
)
from moe_jax.safety.audit import audit, routing_profile, split_safety_set
from moe_jax.safety.monitor import RoutingMonitor, detection_rates
from moe_jax.safety.protect import SafetyCritical, protect_scores, removed_by, safety_critical
from moe_jax.safety.reachability import ReachResult, count_activations, reachability, resolve_target, transfer
from moe_jax.safety.routes import force_masks, free_routes, layout

__all__ = ["AttackError", "AttackResult", "route_forcing", "router_masking", "expert_silencing",
           "forbidden_specificity", "audit", "routing_profile", "split_safety_set", "RoutingMonitor",
           "detection_rates", "SafetyCritical", "safety_critical", "protect_scores", "removed_by", "ReachResult",
           "reachability", "resolve_target", "transfer", "count_activations", "force_masks", "free_routes", "layout"]
