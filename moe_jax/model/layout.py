"""The parameter tree every part of moe_jax agrees on, and helpers to walk it.

Params are plain nested dicts (Flax Linen naming: `kernel` is (in, out), `scale`, `embedding`):

    embed/embedding                       (V, D)
    layer_{i}/input_norm/scale            (D,)
    layer_{i}/post_attn_norm/scale        (D,)
    layer_{i}/attn/...                    GQA: q_proj, k_proj, v_proj, o_proj {kernel[, bias]},
                                               q_norm, k_norm {scale} ((hd,) per head or
                                               (H*hd,) full width)
                                          MLA: q_proj | q_a_proj + q_a_norm + q_b_proj,
                                               kv_a_proj, kv_a_norm, kv_b_proj, o_proj
    layer_{i}/mlp/{gate_proj,up_proj,down_proj}/kernel      dense layers
    layer_{i}/moe/router/kernel           (D, E)       float32 router maths
    layer_{i}/moe/score_bias              (E,)         DeepSeek-V3 e_score_correction_bias
    layer_{i}/moe/experts/bucket_{b}/gate (E_b, D, F_b)
    layer_{i}/moe/experts/bucket_{b}/up   (E_b, D, F_b)
    layer_{i}/moe/experts/bucket_{b}/down (E_b, F_b, D)
    layer_{i}/moe/shared/{gate_proj,up_proj,down_proj}/kernel   shared expert(s)
    layer_{i}/moe/shared_gate/kernel      (D, 1)       Qwen2-MoE sigmoid gate
    final_norm/scale                      (D,)
    lm_head/kernel                        (D, V)       absent when embeddings are tied

Experts of a layer live in width buckets (`ModelConfig.expert_buckets`): bucket b holds the
experts `bucket.expert_ids` (router indices, ascending) at width `bucket.width`; an expert
narrower than its bucket is zero-padded, and zero gate/up columns with zero down rows add
exactly nothing. A uniform layer is one bucket without padding.

Masks (inputs, never params), per MoE layer name: {"dims": (E, F_max) or (B, E, F_max),
"experts": (E,) or (B, E)} with F_max = the layer's widest expert; a leading B axis gives a
mask per sequence (per-sample gradients in one backward pass).

Shape suffixes (`x_BTD`, `gate_DF`) name each axis with one letter, used for one thing
everywhere in moe_jax:

    B  sequences (a batch's rows; the leading axis of a per-sequence mask)
    T  token positions (in an MoE layer: the batch's tokens, flattened)
    S  key/value positions in attention       P  prompt positions when decoding
    D  model width                            V  vocabulary
    H  query heads                            G  key/value heads
    d  query/key head width                   e  value head width, h  rotary half width
    E  routed experts                         F  expert width (intermediate dims)
    K  experts chosen per token (top-k)       R  routed rows, one per (token, choice): T*K
    N  rows of any flat list (sorted rows, rows received from other devices)
    M  tiles (blocks) of sorted rows (`tiles`)  C  rows per tile
    U  expert groups (group-limited routing)  g  experts per group
    X  devices on the "expert" mesh axis      L  expert slots per device
    I  input columns of a grouped matmul      O  its output columns (`model.grouped_gemm`)
    A digit is a literal size (`spans_E2`: [first, end) per expert; `kept_T1`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_jax.config import ModelConfig

Params = dict[str, Any]


def expert_weight(cfg: ModelConfig, params: Params, layer: int, expert: int) -> dict[str, np.ndarray]:
    """One expert's unpadded weights {gate (D, F_e), up (D, F_e), down (F_e, D)}."""
    width = cfg.expert_widths[layer][expert]
    experts = params[cfg.layer_name(layer)]["moe"]["experts"]
    for b, bucket in enumerate(cfg.expert_buckets(layer)):
        if expert in bucket.expert_ids:
            j = bucket.expert_ids.index(expert)
            w = experts[f"bucket_{b}"]
            return {
                "gate": w["gate"][j, :, :width],
                "up": w["up"][j, :, :width],
                "down": w["down"][j, :width, :],
            }
    raise KeyError(f"layer {layer} has no expert {expert}")


def pack_experts(cfg: ModelConfig, layer: int, per_expert: list[dict[str, Any]], xp=np) -> Params:
    """Bucketed expert params of one layer from a list of per-expert {gate, up, down}.

    `per_expert[e]` holds gate (D, F_e), up (D, F_e), down (F_e, D); `xp` is numpy or
    jax.numpy. Narrow experts are zero-padded to their bucket's width.
    """
    out = {}
    for b, bucket in enumerate(cfg.expert_buckets(layer)):
        gates, ups, downs = [], [], []
        for e in bucket.expert_ids:
            w = per_expert[e]
            pad = bucket.width - w["gate"].shape[1]
            gates.append(xp.pad(w["gate"], ((0, 0), (0, pad))))
            ups.append(xp.pad(w["up"], ((0, 0), (0, pad))))
            downs.append(xp.pad(w["down"], ((0, pad), (0, 0))))
        out[f"bucket_{b}"] = {"gate": xp.stack(gates), "up": xp.stack(ups), "down": xp.stack(downs)}
    return out
