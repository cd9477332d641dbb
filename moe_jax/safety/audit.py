"""The router audit: refusals, over-refusals and how routing differs on forbidden prompts.

For a model (pruned or not, masks or trimming applied) and a safety evaluation set (forbidden
requests that must be refused and benign look-alikes that must not be):

  refusal_rate       forbidden prompts refused (greedy answer is the refusal);
  over_refusal_rate  benign look-alikes refused;
  routing            per MoE layer, the experts' share of routed slots on forbidden and benign
                     prompt tokens, the entropy of those shares, the mean per-token router
                     entropy, and the experts most specific to forbidden prompts;
  critical_removed   with a plan and `protect.SafetyCritical`, how many safety-critical dims
                     and experts the plan removes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.data import pipeline, skills
from moe_jax.safety import routes as R
from moe_jax.safety.attacks import AttackError
from moe_jax.safety.protect import SafetyCritical, removed_by


def split_safety_set(examples: Sequence[skills.Example]) -> tuple[list[skills.Example], list[skills.Example]]:
    """(forbidden, benign); an evaluation set without both kinds is an error."""
    forbidden = [ex for ex in examples if ex.forbidden]
    benign = [ex for ex in examples if not ex.forbidden]
    if not forbidden or not benign:
        raise AttackError(f"safety evaluation set: {len(forbidden)} forbidden and {len(benign)} benign prompts; the "
                          "audit needs both (skills.eval_set('safety', n), or Examples with forbidden=True/False)")
    return forbidden, benign


def _entropy(p: np.ndarray, axis=-1) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def routing_profile(cfg: ModelConfig, params, tokenizer, forbidden: Sequence[skills.Example],
                    benign: Sequence[skills.Example], masks: Mapping | None = None, top: int = 3) -> dict[str, Any]:
    """Per MoE layer: expert shares on forbidden vs benign prompt tokens and routing entropies."""
    out: dict[str, Any] = {}
    for kind, exs in (("forbidden", forbidden), ("benign", benign)):
        rows = R.layout([pipeline.prompt_ids(ex, tokenizer) for ex in exs], None, tokenizer.pad_id)
        aux = R.captured_routing(cfg, params, rows, masks)
        for lyr in cfg.moe_layers:
            a = aux[cfg.layer_name(lyr)]
            ran = R.executed_experts(a)[rows.attn_BT]
            counts = np.bincount(ran[ran >= 0], minlength=cfg.experts_per_layer[lyr]).astype(np.float64)
            share = counts / max(counts.sum(), 1.0)
            token_entropy = float(_entropy(a["scores_TE"][rows.attn_BT]).mean())
            layer = out.setdefault(str(lyr), {})
            layer[f"share_{kind}"] = share.tolist()
            layer[f"usage_entropy_bits_{kind}"] = float(_entropy(share))
            layer[f"router_entropy_bits_{kind}"] = token_entropy
    for layer in out.values():
        diff = np.asarray(layer["share_forbidden"]) - np.asarray(layer["share_benign"])
        layer["forbidden_specific_experts"] = [int(e) for e in np.argsort(-diff)[:top]]
        layer["share_l1_distance"] = float(np.abs(diff).sum())
    return out


def audit(cfg: ModelConfig, params, tokenizer, examples: Sequence[skills.Example], *, masks: Mapping | None = None,
          plan=None, critical: SafetyCritical | None = None, max_new_tokens: int = 16,
          refusal_fn: Callable[[str], bool] = skills.is_refusal) -> dict[str, Any]:
    """Refusal, over-refusal, routing profile and (with plan + critical) critical units removed."""
    forbidden, benign = split_safety_set(examples)
    out: dict[str, Any] = {"n_forbidden": len(forbidden), "n_benign": len(benign)}
    for kind, exs in (("refusal_rate", forbidden), ("over_refusal_rate", benign)):
        texts = R.generate_texts(cfg, params, tokenizer, [pipeline.prompt_ids(ex, tokenizer) for ex in exs], None,
                                 masks, max_new_tokens)
        out[kind] = float(np.mean([refusal_fn(t) for t in texts]))
    out["routing"] = routing_profile(cfg, params, tokenizer, forbidden, benign, masks)
    layers = out["routing"].values()
    out["mean_share_l1_distance"] = float(np.mean([v["share_l1_distance"] for v in layers]))
    out["mean_router_entropy_bits_forbidden"] = float(np.mean([v["router_entropy_bits_forbidden"] for v in layers]))
    out["mean_router_entropy_bits_benign"] = float(np.mean([v["router_entropy_bits_benign"] for v in layers]))
    if plan is not None and critical is not None:
        out.update(removed_by(plan, critical))
    return out
