"""Trajectory statistics for expert pruning (MoE Pathfinder and its baselines).

From the routing and MoE inputs captured in the calibration forward, per MoE layer:

- per sequence s and expert e: routed-token count, router probability mass, and REAP's
  activation strength sum of g * ||f_e(x)|| (for the per-sequence path graphs);
- `routed` reconstruction error of expert e: the change of the layer's routed output when e is
  removed from a token that chose it, gates renormalised over the remaining choices,
      ||y - y_without_e|| = g_e * ||W f_e(x) - y|| / (W - g_e),   W = sum_k g_k,
  which needs only the routed experts' outputs: the calibration forward captures them
  (`expert_outputs`), so it costs a few norms on top of the forward, no expert matmul;
- `dense` reconstruction error, the reference code's ||y - f_e(x)|| with every expert run on
  every token (E dense expert passes per layer; for fidelity checks on small models);
- transition counts between the experts a token uses in consecutive MoE layers;
- a sample of MoE inputs (for NAEE's subset search, done on the host later).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.model import moe

Params = dict[str, Any]
_EPS = 1e-9


def captures(impl: str) -> tuple[str, ...]:
    """What the calibration forward captures for `layer_trajectory`: the expert outputs too,
    except under expert parallelism, whose dispatch does not return them (recomputed then)."""
    return ("routing", "moe_inputs") + (() if impl == "expert_parallel" else ("expert_outputs",))


def _expert_params(params: Params, cfg: ModelConfig, layer: int):
    return params[cfg.layer_name(layer)]["moe"]["experts"]


def per_choice_outputs(cfg: ModelConfig, params: Params, layer: int, x_TD, idx_TK, impl: str = "auto"):
    """f_{e_k}(x_t) for every routed choice k: (T, K, D), one dropless routed pass (each used
    expert's weights read once). Calibration takes these from its forward instead."""
    experts = _expert_params(params, cfg, layer)
    ones_TK = jnp.ones(idx_TK.shape, jnp.float32)
    return moe.experts_forward(cfg, layer, experts, x_TD, (idx_TK, ones_TK), impl=impl, per_choice=True)[1]["out_TKD"]


def routed_recon(f_TKD, w_TK, idx_TK, valid_T, num_experts: int):
    """Per token and choice, ||y - y_without_e|| with renormalised gates; summed per expert (E,)
    and returned per (token, choice) (T, K) for per-sequence sums."""
    w = w_TK.astype(jnp.float32)
    y_TD = jnp.einsum("tk,tkd->td", w, f_TKD)
    W_T1 = w.sum(-1, keepdims=True)
    rest_TK = W_T1 - w
    renorm_TK = w * jnp.linalg.norm(W_T1[..., None] * f_TKD - y_TD[:, None, :], axis=-1) / jnp.maximum(rest_TK, _EPS)
    # A token's only expert (top-1) leaves nothing to renormalise over: removing it loses g * ||f||.
    delta_TK = jnp.where(rest_TK > _EPS, renorm_TK, w * jnp.linalg.norm(f_TKD, axis=-1))
    delta_TK = delta_TK * valid_T[:, None]
    sums_E = jax.ops.segment_sum(delta_TK.reshape(-1), idx_TK.reshape(-1), num_segments=num_experts)
    return sums_E, delta_TK


def dense_recon(cfg: ModelConfig, params: Params, layer: int, x_TD, y_TD, valid_T):
    """sum over valid tokens of ||y - f_e(x)|| for every expert e (E,), running e on every token:
    one plain (T, D) expert pass per expert, no dispatch (the reference code's method)."""
    experts = _expert_params(params, cfg, layer)
    sums_E = jnp.zeros(cfg.experts_per_layer[layer], jnp.float32)
    for b, bucket in enumerate(cfg.expert_buckets(layer)):
        w = experts[f"bucket_{b}"]

        def one(w_e):
            f_TD = moe.swiglu(x_TD, *w_e)[1]
            return jnp.sum(jnp.linalg.norm(y_TD - f_TD, axis=-1) * valid_T)

        sums_E = sums_E.at[jnp.asarray(bucket.expert_ids)].set(jax.lax.map(one, (w["gate"], w["up"], w["down"])))
    return sums_E


def per_sequence(values_BTK, idx_BTK, num_experts: int):
    """(B, E) sums over each sequence's (token, choice) values by chosen expert."""
    onehot = jax.nn.one_hot(idx_BTK, num_experts, dtype=jnp.float32)
    return jnp.einsum("btk,btke->be", values_BTK, onehot)


def transitions(idx_a_BTK, idx_b_BTK, valid_BT, e_a: int, e_b: int):
    """(E_a, E_b) counts of tokens using expert i in one MoE layer and j in the next."""
    a = jax.nn.one_hot(idx_a_BTK, e_a, dtype=jnp.float32).sum(2) * valid_BT[..., None]
    b = jax.nn.one_hot(idx_b_BTK, e_b, dtype=jnp.float32).sum(2)
    return jnp.einsum("bti,btj->ij", a, b)


def layer_trajectory(cfg: ModelConfig, params: Params, layer: int, aux: dict, valid_BT, *, dense: bool,
                     impl: str = "auto") -> tuple[dict[str, Any], dict[str, Any]]:
    """(dataset sums, per-sequence (B, E) sums) of one MoE layer from its captured routing."""
    x_BTD, idx_BTK, w_BTK, scores_BTE = aux["x"], aux["idx_TK"], aux["weights_TK"], aux["scores_TE"]
    B, T, K = idx_BTK.shape
    E = cfg.experts_per_layer[layer]
    x_TD, idx_TK, w_TK = x_BTD.reshape(B * T, -1), idx_BTK.reshape(B * T, K), w_BTK.reshape(B * T, K)
    valid_T = valid_BT.reshape(-1).astype(jnp.float32)
    if "expert_outputs" in aux:  # the forward's own expert outputs: no second routed pass
        f_TKD = aux["expert_outputs"].reshape(B * T, K, -1)
    else:
        f_TKD = per_choice_outputs(cfg, params, layer, x_TD, idx_TK, impl)
    recon_E, delta_TK = routed_recon(f_TKD, w_TK, idx_TK, valid_T, E)
    strength_TK = w_TK.astype(jnp.float32) * jnp.linalg.norm(f_TKD, axis=-1) * valid_T[:, None]
    count_TK = jnp.broadcast_to(valid_T[:, None], (B * T, K))
    seq = {
        "seq_count": per_sequence(count_TK.reshape(B, T, K), idx_BTK, E),
        "seq_prob_mass": jnp.sum(scores_BTE * valid_BT[..., None], axis=1),
        "seq_strength": per_sequence(strength_TK.reshape(B, T, K), idx_BTK, E),
        "seq_recon_routed": per_sequence(delta_TK.reshape(B, T, K), idx_BTK, E),
    }
    sums = {"recon_routed_sum": recon_E}
    if dense:
        y_TD = jnp.einsum("tk,tkd->td", w_TK.astype(jnp.float32), f_TKD)
        sums["recon_dense_sum"] = dense_recon(cfg, params, layer, x_TD, y_TD, valid_T)
    return jax.lax.stop_gradient(sums), jax.lax.stop_gradient(seq)
