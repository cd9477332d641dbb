"""Layer-by-layer scoring: `collect`'s statistics with one decoder layer's weights on the device at a time.

For models whose weights do not fit one device. Params stay on the host (numpy); every
calibration micro-batch's residual stream is kept on the host between layers instead:

  forward   embed on the host, then for each layer: load its weights, run every micro-batch
            through it (activation, routing and trajectory sums come from here), keep each
            layer's input, free the weights;
  head      final norm + LM head + the per-sequence loss of `collect`; its gradient with
            respect to the last hidden state starts the cotangent;
  backward  layers in reverse order, from the last down to the first MoE layer: load the
            weights, `jax.vjp` of the layer (recomputed from its stored input) with respect to
            (input, per-sequence dims mask), carry the input cotangent down, square-sum the
            mask gradient, free the weights.

The sum of per-sequence losses and the (B, E, F_max) ones mask are exactly `collect`'s, so the
Fisher is the same number. A layer's step is jit-compiled for a one-layer config, so layers of
the same shape share one compiled program. Every statistic of `STATISTICS` is supported;
checkpoint/resume is not (the pass is layer-major, so a partial run holds no finished batch).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax.config import ModelConfig
from moe_jax.model import transformer
from moe_jax.model.attention import RMSNorm, rope_cos_sin
from moe_jax.scoring import trajectory
from moe_jax.scoring.collect import (
    ACT_STATS,
    GRAD_STATS,
    TRAJ_STATS,
    Batch,
    Params,
    ScoreState,
    calibration_rows,
    finish_scores,
    micro_batches,
    progress_bar,
)
from moe_jax.scoring.statistics import STATISTICS, Scores, ScoringError

LAYERWISE_STATISTICS = STATISTICS


# ============================================================================ device residency
def _to_device(tree: Any, device: jax.Device | None) -> Any:
    """The one way layer (and head) weights reach the device here; tests spy on it."""
    return jax.device_put(tree, device)


def _release(tree: Any) -> None:
    """Free the device buffers now rather than whenever Python collects them."""
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf.delete()


def _host(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


# ============================================================================ one layer
def layer_config(cfg: ModelConfig, layer: int) -> ModelConfig:
    """A one-layer config holding `layer`'s kind and experts: equal for layers of equal shape, so
    their steps share one compiled program."""
    return cfg.replace(num_layers=1, layer_kinds=(cfg.layer_kinds[layer],),
                       experts_per_layer=(cfg.experts_per_layer[layer],), expert_widths=(cfg.expert_widths[layer],))


def _apply_layer(cfg1: ModelConfig, dtype: str, p: Params, x_BTD, segment_ids_BT, layer_masks, capture, impl):
    """DecoderLayer 0 of `cfg1` with the attention inputs `transformer.forward` builds from segment ids."""
    B, T = segment_ids_BT.shape
    valid_BT = segment_ids_BT > 0
    key_valid = transformer.segment_mask(segment_ids_BT) & valid_BT[:, None, :]
    cos, sin = rope_cos_sin(cfg1, transformer.segment_positions(segment_ids_BT))
    module = transformer.DecoderLayer(cfg1, 0, jnp.dtype(dtype))
    y_BTD, _, aux = module.apply({"params": p}, x_BTD, cos, sin, jnp.arange(T), key_valid, None, 0, layer_masks,
                                 capture, impl, valid_BT)
    return y_BTD, aux


@functools.partial(jax.jit, static_argnames=("cfg1", "dtype", "want_acts", "want_traj", "want_dense", "impl"))
def _layer_forward(cfg1: ModelConfig, dtype: str, p: Params, x_BTD, segment_ids_BT, *, want_acts: bool,
                   want_traj: bool, want_dense: bool, impl: str):
    """(output, {stat: sum}, {per-sequence stat: array}, chosen experts idx_BTK or None) of one layer."""
    is_moe = cfg1.layer_kinds[0] == "moe"
    capture = (("activations", "routing") if want_acts else ()) + (trajectory.captures(impl) if want_traj else ())
    capture = tuple(dict.fromkeys(capture)) if is_moe else ()
    y_BTD, aux = _apply_layer(cfg1, dtype, p, x_BTD, segment_ids_BT, None, capture, impl)
    sums, per_seq, idx_BTK = {}, {}, None
    if not is_moe:
        return y_BTD, sums, per_seq, idx_BTK
    valid_BT = segment_ids_BT > 0
    if want_acts:
        for key in ("act_abs_sum", "act_weighted_abs_sum", "count", "weighted_out_norm_sum"):
            sums[key] = aux[key]
        sums["prob_mass"] = jnp.sum(aux["scores_TE"] * valid_BT[..., None], axis=(0, 1))
    if want_traj:
        layer_sums, seq = trajectory.layer_trajectory(cfg1, {cfg1.layer_name(0): p}, 0, aux, valid_BT,
                                                      dense=want_dense, impl=impl)
        sums.update(layer_sums)
        sums["count_traj"] = seq["seq_count"].sum(0)
        per_seq = dict(seq, moe_input=aux["x"])
        idx_BTK = aux["idx_TK"]
    return y_BTD, sums, per_seq, idx_BTK


def _ones_dims(cfg1: ModelConfig, batch: int):
    return {"dims": jnp.ones((batch, cfg1.experts_per_layer[0], cfg1.max_width(0)), jnp.float32)}


@functools.partial(jax.jit, static_argnames=("cfg1", "dtype", "impl"))
def _layer_backward(cfg1: ModelConfig, dtype: str, p: Params, x_BTD, segment_ids_BT, dy_BTD, *, impl: str):
    """(input cotangent, {fisher_sum, grad_abs_sum} over the micro-batch) of one layer, forward recomputed."""
    is_moe = cfg1.layer_kinds[0] == "moe"
    masks = _ones_dims(cfg1, x_BTD.shape[0]) if is_moe else None
    run = lambda x, m: _apply_layer(cfg1, dtype, p, x, segment_ids_BT, m, (), impl)[0]
    _, vjp = jax.vjp(run, x_BTD, masks)
    dx_BTD, dmasks = vjp(dy_BTD)
    if not is_moe:
        return dx_BTD, {}
    g_BEF = dmasks["dims"]
    return dx_BTD, {"fisher_sum": jnp.sum(g_BEF**2, axis=0), "grad_abs_sum": jnp.sum(jnp.abs(g_BEF), axis=0)}


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _head_grad(cfg: ModelConfig, dtype: str, head: Params, x_BTD, targets_BT, weights_BT):
    """d(sum of per-sequence mean losses)/d(last hidden state), as `collect`'s loss defines it."""

    def loss(x):
        h = RMSNorm(cfg.rms_norm_eps, jnp.dtype(dtype)).apply({"params": head["final_norm"]}, x)
        w_DV = head["embed"]["embedding"].T if cfg.tie_word_embeddings else head["lm_head"]["kernel"]
        logits = jnp.dot(h, w_DV.astype(h.dtype), preferred_element_type=jnp.float32)
        ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BT)
        per_seq_B = (ce_BT * weights_BT).sum(-1) / jnp.maximum(weights_BT.sum(-1), 1.0)
        return per_seq_B.sum()

    return jax.grad(loss)(x_BTD)


@functools.partial(jax.jit, static_argnames=("e_a", "e_b"))
def _transitions(idx_a_BTK, idx_b_BTK, valid_BT, *, e_a: int, e_b: int):
    return trajectory.transitions(idx_a_BTK, idx_b_BTK, valid_BT, e_a, e_b)


# ============================================================================ the pass
def _check(cfg: ModelConfig, params: Params, statistics: Sequence[str], micro_batch_size: int) -> None:
    unknown = sorted(set(statistics) - set(LAYERWISE_STATISTICS))
    if unknown or not statistics:
        raise ScoringError(f"statistics {list(statistics)}: unknown or not supported layer-wise {unknown}; "
                           f"expected some of {list(LAYERWISE_STATISTICS)}")
    if micro_batch_size < 1:
        raise ScoringError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not cfg.moe_layers:
        raise ScoringError(f"model {cfg.model_type} has no MoE layers to score")
    head = ["embed", "final_norm"] + ([] if cfg.tie_word_embeddings else ["lm_head"])
    missing = [k for k in head + [cfg.layer_name(i) for i in range(cfg.num_layers)] if k not in params]
    if missing:
        raise ScoringError(f"params lack {missing[:4]} (the config has {cfg.num_layers} layers); expected the "
                           "moe_jax layout of this config")


def collect_layerwise(cfg: ModelConfig, params: Params, batches: Iterable[Batch],
                      statistics: Sequence[str] = ("fisher",), *, micro_batch_size: int = 8, seed: int = 0,
                      impl: str = "auto", sample_tokens: int = 256, device: jax.Device | None = None,
                      progress: bool = True) -> Scores:
    """`collect(cfg, params, batches, statistics, ...)` computed one decoder layer at a time.

    params: host arrays (numpy; e.g. `hf.load_pretrained(path, place=lambda p, a: a)`); device
    arrays are read back to the host. Each layer's weights are put on `device` (default: the first)
    for its forward and again for its backward, then freed. Host memory holds every calibration
    token's hidden state for each layer once, (L+1) x tokens x hidden in the params' dtype, only
    when a gradient statistic is asked for (else one layer's).
    """
    statistics = tuple(dict.fromkeys(statistics))
    _check(cfg, params, statistics, micro_batch_size)
    want_grad = any(s in statistics for s in GRAD_STATS)
    want_acts = any(s in statistics for s in ACT_STATS)
    want_traj = any(s in statistics for s in TRAJ_STATS)
    want_dense = "recon_dense" in statistics
    state = ScoreState("layerwise", sample_tokens if want_traj else 0)
    if not (want_grad or want_acts or want_traj):
        return finish_scores(cfg, params, state, statistics, seed)

    chunks = []
    for batch in batches:
        chunks.extend(micro_batches(calibration_rows(batch), micro_batch_size))
        state.batches_done += 1
    for chunk in chunks:
        state.num_tokens += int((chunk["segment_ids"] > 0).sum())
        state.num_sequences += int((chunk["weights"].sum(-1) > 0).sum())
    if state.num_tokens == 0 or (want_grad and state.num_sequences == 0):
        raise ScoringError("no calibration tokens: the batches were empty or every loss weight was 0 "
                           f"({len(chunks)} micro-batches seen); give batches with real tokens")

    embedding = np.asarray(params["embed"]["embedding"])
    dtype = embedding.dtype.name
    x_chunks = [np.take(embedding, c["inputs"], axis=0) for c in chunks]
    first_moe = min(cfg.moe_layers)
    inputs: dict[int, list[np.ndarray]] = {}  # layer -> its input per chunk (backward only)
    bar = progress_bar(cfg.num_layers * (2 if want_grad else 1), 0, progress)
    prev_moe, prev_idx = None, []
    for layer in range(cfg.num_layers):
        cfg1, name = layer_config(cfg, layer), cfg.layer_name(layer)
        p = _to_device(_host(params[name]), device)
        if want_grad and layer >= first_moe:
            inputs[layer] = x_chunks
        outputs, idx = [], []
        for c, x_BTD in zip(chunks, x_chunks):
            y, sums, per_seq, idx_BTK = _layer_forward(cfg1, dtype, p, x_BTD, c["segment_ids"], want_acts=want_acts,
                                                       want_traj=want_traj, want_dense=want_dense, impl=impl)
            outputs.append(np.asarray(y))
            valid_BT = c["segment_ids"] > 0
            state.add({k: {name: v} for k, v in sums.items()}, {"tokens": 0, "sequences": 0, "valid_BT": valid_BT},
                      {k: {name: v} for k, v in per_seq.items()})
            if idx_BTK is not None:
                idx.append(idx_BTK)
        _release(p)
        if want_traj and cfg.layer_kinds[layer] == "moe":
            if prev_moe is not None:
                e_a, e_b = cfg.experts_per_layer[prev_moe], cfg.experts_per_layer[layer]
                for c, a, b in zip(chunks, prev_idx, idx):
                    t = _transitions(a, b, c["segment_ids"] > 0, e_a=e_a, e_b=e_b)
                    state.add({"transitions": {cfg.layer_name(prev_moe): t}},
                              {"tokens": 0, "sequences": 0, "valid_BT": c["segment_ids"] > 0})
            prev_moe, prev_idx = layer, idx
        x_chunks = outputs
        bar.update(1)

    if want_grad:
        head_names = ["final_norm", "embed" if cfg.tie_word_embeddings else "lm_head"]
        head = _to_device({k: _host(params[k]) for k in head_names}, device)
        dys = [_head_grad(cfg, dtype, head, x, c["targets"], c["weights"]) for c, x in zip(chunks, x_chunks)]
        dys = [np.asarray(d) for d in dys]
        _release(head)
        for layer in range(cfg.num_layers - 1, first_moe - 1, -1):
            cfg1, name = layer_config(cfg, layer), cfg.layer_name(layer)
            p = _to_device(_host(params[name]), device)
            for n, (c, x_BTD) in enumerate(zip(chunks, inputs.pop(layer))):
                dx, sums = _layer_backward(cfg1, dtype, p, x_BTD, c["segment_ids"], dys[n], impl=impl)
                dys[n] = np.asarray(dx)
                if sums:
                    state.add({k: {name: v} for k, v in sums.items()},
                              {"tokens": 0, "sequences": 0, "valid_BT": c["segment_ids"] > 0})
            _release(p)
            bar.update(1)
    bar.close()
    return finish_scores(cfg, params, state, statistics, seed)


__all__ = ["collect_layerwise", "layer_config", "LAYERWISE_STATISTICS"]
