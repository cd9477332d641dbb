"""Physical compaction: a plan becomes a smaller config and smaller weights.

Kept experts keep their router columns (and DeepSeek-V3 score bias), kept dims keep their
gate/up columns and down rows; per-expert widths go into the config, and the experts are
re-bucketed (`ModelConfig.expert_buckets`) so non-uniform layers are not padded to their
widest expert. Shared experts, attention and embeddings are untouched.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.model.layout import expert_weight, pack_experts
from moe_jax.pruning.plan import PlanError, PruningPlan

Params = dict[str, Any]


def _copy_tree(tree):
    return {k: _copy_tree(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def apply(cfg: ModelConfig, params: Params, plan: PruningPlan) -> tuple[ModelConfig, Params]:
    """(config, params) of the pruned model; its logits equal `forward(cfg, params, masks(plan))`."""
    plan.check(cfg)
    _check_groups(cfg, plan)
    new_cfg, new = cfg, _copy_tree(params)
    for layer in cfg.moe_layers:
        kept = list(plan.experts[layer])
        name = cfg.layer_name(layer)
        host = _host_experts(cfg, params, layer)
        per = []
        for e in kept:
            w = expert_weight(cfg, host, layer, e)
            j = np.asarray(plan.dims[layer][e], np.int64)
            per.append({"gate": w["gate"][:, j], "up": w["up"][:, j], "down": w["down"][j, :]})
        new_cfg = new_cfg.with_layer_experts(layer, [len(plan.dims[layer][e]) for e in kept])
        moe = new[name]["moe"]
        moe["experts"] = jax.tree.map(jnp.asarray, pack_experts(new_cfg, layer, per))
        if len(kept) < cfg.experts_per_layer[layer]:
            cols = jnp.asarray(kept)
            moe["router"]["kernel"] = moe["router"]["kernel"][:, cols]
            if "score_bias" in moe:
                moe["score_bias"] = moe["score_bias"][cols]
    new_cfg.validate()
    return new_cfg, new


def _host_experts(cfg: ModelConfig, params: Params, layer: int) -> Params:
    """A params view holding only `layer`'s experts, as numpy. Expert surgery runs on the host:
    experts get different widths, and eager jax would compile one gather or pad per width."""
    name = cfg.layer_name(layer)
    return {name: {"moe": {"experts": jax.tree.map(np.asarray, params[name]["moe"]["experts"])}}}


def _check_groups(cfg: ModelConfig, plan: PruningPlan) -> None:
    """Group-limited routers (DeepSeek) score contiguous groups of E / n_group experts: removal must
    leave every group the same number of experts, or compaction would regroup them."""
    if cfg.topk_method == "greedy" or cfg.n_group <= 1:
        return
    for layer in cfg.moe_layers:
        E = cfg.experts_per_layer[layer]
        per_group = np.bincount(np.asarray(plan.experts[layer]) // (E // cfg.n_group), minlength=cfg.n_group)
        if len(set(per_group.tolist())) > 1:
            raise PlanError(f"layer {layer} would keep {per_group.tolist()} experts in its {cfg.n_group} router "
                            f"groups; {cfg.topk_method} routing needs the same count in every group, so this plan can "
                            "only be simulated (pruning.masks), not compacted")


def pad_to_uniform(cfg: ModelConfig, params: Params, multiple_of: int = 8) -> tuple[ModelConfig, Params]:
    """Zero-pad every expert to the widest one (rounded up to `multiple_of`), so stock loaders
    (one moe_intermediate_size) read it. The outputs are exactly those of the non-uniform
    model; nothing is saved. transformers' grouped-matmul expert kernel needs 16-byte row
    strides, hence the rounding."""
    counts = {cfg.experts_per_layer[i] for i in cfg.moe_layers}
    if len(counts) > 1:
        raise PlanError(f"pad_to_uniform: MoE layers hold different expert counts {sorted(counts)}; stock "
                        "configs have one num_experts, so only width padding is possible here")
    if multiple_of < 1:
        raise PlanError(f"pad_to_uniform: multiple_of={multiple_of} must be >= 1")
    width = max(max(cfg.expert_widths[i]) for i in cfg.moe_layers)
    width = -(-width // multiple_of) * multiple_of
    new_cfg, new = cfg, _copy_tree(params)
    for layer in cfg.moe_layers:
        host = _host_experts(cfg, params, layer)
        per = [expert_weight(cfg, host, layer, e) for e in range(cfg.experts_per_layer[layer])]
        new_cfg = new_cfg.with_layer_experts(layer, [width] * cfg.experts_per_layer[layer])
        new[cfg.layer_name(layer)]["moe"]["experts"] = jax.tree.map(jnp.asarray, pack_experts(new_cfg, layer, per))
    return new_cfg, new


def routed_bytes(cfg: ModelConfig, dtype: Any = np.float32) -> int:
    """Bytes of the routed experts' weights at their real widths."""
    item = np.dtype(dtype).itemsize
    return sum(3 * cfg.hidden_size * sum(cfg.expert_widths[i]) * item for i in cfg.moe_layers)
