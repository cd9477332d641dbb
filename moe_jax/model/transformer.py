"""The MoE decoder as Flax Linen modules, and the functional `init` / `forward` around them.

`forward(cfg, params, tokens, masks=None)` is the one entry point everything calls: scoring
differentiates it with respect to `masks`, evaluation and generation run it with a KV cache,
pruning compares its logits before and after compaction. Params are plain nested dicts laid
out as in `moe_jax.model.layout`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.model import moe
from moe_jax.model.attention import GQAttention, Linear, MLAttention, RMSNorm, rope_cos_sin

_INIT = nn.initializers.normal(stddev=0.02)
# routing: Routing fields; activations: experts_forward stats; moe_inputs: x of each MoE block;
# expert_outputs: each routed choice's f_e(x) (B, T, K, D), reused by calibration.
CAPTURES = ("routing", "activations", "moe_inputs", "expert_outputs")


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and shared experts)."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        g = Linear(self.width, False, self.dtype, name="gate_proj")(x)
        u = Linear(self.width, False, self.dtype, name="up_proj")(x)
        return Linear(x.shape[-1], False, self.dtype, name="down_proj")(nn.silu(g) * u)


class _Params(nn.Module):
    """A named group of raw arrays (so the tree reads experts/bucket_0/gate, not .../kernel)."""

    shapes: Mapping[str, tuple[int, ...]]
    dtype: Any = jnp.float32
    init: Any = _INIT

    @nn.compact
    def __call__(self):
        return {name: self.param(name, self.init, shape, self.dtype) for name, shape in self.shapes.items()}


class _Experts(nn.Module):
    cfg: ModelConfig
    layer: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        D = self.cfg.hidden_size
        out = {}
        for b, bucket in enumerate(self.cfg.expert_buckets(self.layer)):
            n, F = len(bucket.expert_ids), bucket.width
            shapes = {"gate": (n, D, F), "up": (n, D, F), "down": (n, F, D)}
            out[f"bucket_{b}"] = _Params(shapes, self.dtype, name=f"bucket_{b}")()
        return out


def _per_token(mask, seq_id_T):
    """(E,) or (B, E) expert mask -> (T, E) per flattened token."""
    if mask is None:
        return None
    return mask[seq_id_T] if mask.ndim == 2 else jnp.broadcast_to(mask, (seq_id_T.shape[0],) + mask.shape)


def _forced_routes(force_BTE, shape, layer):
    """(B, T, E) allowed-expert rows (route forcing) -> (T, E) per flattened token."""
    if tuple(force_BTE.shape) != shape:
        raise ValueError(f"masks[layer {layer}]['force'] has shape {tuple(force_BTE.shape)}, expected (batch, "
                         f"tokens, experts) = {shape}: one 0/1 row of allowed experts per token")
    return force_BTE.reshape(shape[0] * shape[1], shape[2])


class MoEBlock(nn.Module):
    """Router + routed experts (+ shared expert with optional sigmoid gate)."""

    cfg: ModelConfig
    layer: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, layer_masks, capture: tuple[str, ...], impl: str, token_valid_BT=None):
        cfg, layer, dt = self.cfg, self.layer, self.dtype
        B, T, D = x_BTD.shape
        E = cfg.experts_per_layer[layer]
        # The router is tiny and decides everything downstream: kept in float32 in every dtype.
        p = {"router": _Params({"kernel": (D, E)}, jnp.float32, name="router")()}
        if cfg.router_bias:
            p["score_bias"] = self.param("score_bias", nn.initializers.zeros, (E,), jnp.float32)
        experts = _Experts(cfg, layer, dt, name="experts")()
        x_TD = x_BTD.reshape(B * T, D)
        seq_id_T = jnp.repeat(jnp.arange(B, dtype=jnp.int32), T)
        layer_masks = layer_masks or {}
        force_TE = None
        if layer_masks.get("force") is not None:
            force_TE = _forced_routes(layer_masks["force"], (B, T, E), layer)
        routing = moe.route(cfg, layer, p, x_TD, expert_mask=_per_token(layer_masks.get("experts"), seq_id_T),
                            force_TE=force_TE)
        if "trim" in layer_masks:
            routing = moe.trim(routing, **layer_masks["trim"])
        y_TD, stats = moe.experts_forward(
            cfg, layer, experts, x_TD, routing,
            dims_mask=layer_masks.get("dims"), seq_id_T=seq_id_T,
            impl=impl, collect_stats="activations" in capture,
            token_valid_T=None if token_valid_BT is None else token_valid_BT.reshape(B * T),
            per_choice="expert_outputs" in capture,
        )
        out_TKD = stats.pop("out_TKD", None)
        y_BTD = y_TD.reshape(B, T, D).astype(x_BTD.dtype)
        if cfg.shared_expert_width:
            shared = MLP(cfg.shared_expert_width, dt, name="shared")(x_BTD)
            if cfg.shared_expert_gate:
                gate = Linear(1, False, dt, name="shared_gate")(x_BTD)
                shared = jax.nn.sigmoid(gate) * shared
            y_BTD = y_BTD + shared
        aux = {}
        if "routing" in capture:
            if routing.active_TK is None:
                routing = routing._replace(active_TK=jnp.ones(routing.idx_TK.shape, bool))
            aux.update({k: v.reshape(B, T, -1) for k, v in routing._asdict().items()})
        if "activations" in capture:
            aux.update(stats)
        if "moe_inputs" in capture:
            aux["x"] = x_BTD
        if out_TKD is not None:
            aux["expert_outputs"] = out_TKD.reshape(B, T, *out_TKD.shape[1:])
        return y_BTD, aux


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    layer: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, q_slot_T, key_valid_BS, cache, index, layer_masks, capture, impl,
                 token_valid_BT=None):
        cfg, dt = self.cfg, self.dtype
        attn_cls = MLAttention if cfg.is_mla else GQAttention
        h = RMSNorm(cfg.rms_norm_eps, dt, name="input_norm")(x)
        a, cache = attn_cls(cfg, dt, name="attn")(h, cos, sin, q_slot_T, key_valid_BS, cache, index)
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, dt, name="post_attn_norm")(x)
        aux = {}
        if cfg.layer_kinds[self.layer] == "dense":
            y = MLP(cfg.dense_intermediate_size, dt, name="mlp")(h)
        else:
            y, aux = MoEBlock(cfg, self.layer, dt, name="moe")(h, layer_masks, capture, impl, token_valid_BT)
        return x + y, cache, aux


class Transformer(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, q_slot_T, key_valid_BS, cache=None, index=0, masks=None,
                 capture=(), impl="auto", token_valid_BT=None, embed_delta_BTD=None):
        cfg, dt = self.cfg, self.dtype
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=dt, dtype=dt,
                         embedding_init=_INIT, name="embed")
        x = embed(tokens_BT)
        if embed_delta_BTD is not None:  # input-side attacks move the embeddings (safety.attacks)
            x = x + embed_delta_BTD.astype(x.dtype)
        cos, sin = rope_cos_sin(cfg, positions_BT)
        masks = masks or {}
        new_cache, aux = {}, {}
        for i in range(cfg.num_layers):
            name = cfg.layer_name(i)
            layer_cache = None if cache is None else cache[name]
            x, layer_cache, layer_aux = DecoderLayer(cfg, i, dt, name=name)(
                x, cos, sin, q_slot_T, key_valid_BS, layer_cache, index, masks.get(name), capture, impl,
                token_valid_BT)
            if cache is not None:
                new_cache[name] = layer_cache
            if layer_aux:
                aux[name] = layer_aux
        x = RMSNorm(cfg.rms_norm_eps, dt, name="final_norm")(x)
        if cfg.tie_word_embeddings:
            w_DV = embed.embedding.T
        else:
            w_DV = _Params({"kernel": (cfg.hidden_size, cfg.vocab_size)}, dt, name="lm_head")()["kernel"]
        logits = jnp.dot(x, w_DV.astype(x.dtype), preferred_element_type=jnp.float32)
        return logits, (new_cache if cache is not None else None), aux


# ----------------------------------------------------------------------------- functional API
def _zero_padding(cfg: ModelConfig, params: dict) -> dict:
    """Zero the padded columns of experts narrower than their bucket (they must add nothing)."""
    for layer in cfg.moe_layers:
        experts = params[cfg.layer_name(layer)]["moe"]["experts"]
        for b, bucket in enumerate(cfg.expert_buckets(layer)):
            widths = jnp.array([cfg.expert_widths[layer][e] for e in bucket.expert_ids])
            keep_EF = jnp.arange(bucket.width)[None, :] < widths[:, None]
            w = experts[f"bucket_{b}"]
            w["gate"] = w["gate"] * keep_EF[:, None, :].astype(w["gate"].dtype)
            w["up"] = w["up"] * keep_EF[:, None, :].astype(w["up"].dtype)
            w["down"] = w["down"] * keep_EF[:, :, None].astype(w["down"].dtype)
    return params


def _unfreeze(tree):
    return {k: _unfreeze(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def param_shapes(cfg: ModelConfig, dtype: Any = jnp.float32) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s, traced without allocating anything."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    variables = jax.eval_shape(
        lambda: Transformer(cfg, jnp.dtype(dtype)).init(
            jax.random.PRNGKey(0), tokens, jnp.arange(2)[None], jnp.arange(2), jnp.ones((1, 2), bool),
            capture=(), impl="dense"))
    return _unfreeze(variables["params"])


def init(cfg: ModelConfig, rng: jax.Array, dtype: Any = jnp.float32) -> dict:
    """Random params: normal(0.02) weights, unit norm scales, zero biases; `jax.eval_shape`-able.

    Leaves come from `param_shapes`. With a concrete key the values are drawn by numpy from a
    seed taken from the key: XLA's CPU compiler needs ~0.5 s per threefry call, which made
    creating a tiny model take longer than testing it. Under tracing, `jax.random` is used.
    """
    dtype = jnp.dtype(dtype)
    shapes = param_shapes(cfg, dtype)
    paths, tree = jax.tree_util.tree_flatten_with_path(shapes)
    tracing = isinstance(rng, jax.core.Tracer)
    if tracing:
        keys = list(jax.random.split(rng, len(paths)))
    else:
        seed = [int(x) for x in np.asarray(jax.random.key_data(rng)).ravel()]
        np_rng = np.random.default_rng(seed)
    leaves = []
    for i, (path, s) in enumerate(paths):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            leaves.append(jnp.ones(s.shape, s.dtype))
        elif name in ("bias", "score_bias"):
            leaves.append(jnp.zeros(s.shape, s.dtype))
        elif tracing:
            leaves.append((0.02 * jax.random.normal(keys[i], s.shape, jnp.float32)).astype(s.dtype))
        else:
            leaves.append(jnp.asarray(np_rng.normal(0.0, 0.02, s.shape).astype(np.float32)).astype(s.dtype))
    return _zero_padding(cfg, jax.tree_util.tree_unflatten(tree, leaves))


def default_positions(attention_mask_BT: jax.Array) -> jax.Array:
    """Positions that start at 0 on each row's first real token (left padding), as HF does."""
    return jnp.maximum(jnp.cumsum(attention_mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def _param_dtype(params) -> Any:
    return params["embed"]["embedding"].dtype


def apply(cfg: ModelConfig, params: dict, tokens_BT, positions_BT, q_slot_T, key_valid_BS, *, cache=None,
          index=0, masks=None, capture: Sequence[str] = (), impl: str = "auto", token_valid_BT=None,
          embed_delta_BTD=None):
    """Low-level call of the Linen module (no jit): returns (logits, cache, aux).

    token_valid_BT: which tokens the "activations" statistics count (default: all).
    embed_delta_BTD: added to the token embeddings (gradients w.r.t. inputs, embedding attacks)."""
    unknown = set(capture) - set(CAPTURES)
    if unknown:
        raise ValueError(f"capture={tuple(capture)}: unknown item(s) {sorted(unknown)}; expected {CAPTURES}")
    module = Transformer(cfg, _param_dtype(params))
    return module.apply({"params": params}, tokens_BT, positions_BT, q_slot_T, key_valid_BS, cache, index,
                        masks, tuple(capture), impl, token_valid_BT, embed_delta_BTD)


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token inside its packed segment (0 at the segment's first token)."""
    T = segment_ids_BT.shape[1]
    index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids_BT.shape)
    starts_BT = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                                 segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    start_index_BT = jax.lax.cummax(jnp.where(starts_BT, index_BT, 0), axis=1)
    return index_BT - start_index_BT


def segment_mask(segment_ids_BT: jax.Array) -> jax.Array:
    """(B, T, T) keys a query may see: same segment, and not padding (segment id 0)."""
    seg = segment_ids_BT
    return (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)


@functools.partial(jax.jit, static_argnames=("cfg", "capture", "impl"))
def _forward(cfg, params, tokens, masks, attention_mask, positions, segment_ids, capture, impl, embed_delta):
    B, T = tokens.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), bool) if segment_ids is None else segment_ids > 0
    key_valid = attention_mask.astype(bool)
    if segment_ids is not None:
        key_valid = segment_mask(segment_ids) & key_valid[:, None, :]
    if positions is None:
        positions = default_positions(attention_mask) if segment_ids is None else segment_positions(segment_ids)
    logits, _, aux = apply(cfg, params, tokens, positions, jnp.arange(T), key_valid,
                           masks=masks, capture=capture, impl=impl, token_valid_BT=attention_mask.astype(bool),
                           embed_delta_BTD=embed_delta)
    return logits, aux


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, masks: dict | None = None, *,
            attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, capture: Sequence[str] = (), impl: str = "auto",
            embed_delta: jax.Array | None = None):
    """Logits (B, T, V) in float32; with `capture`, also a dict of per-MoE-layer captures.

    masks: {layer_name: {"dims": (E, F) | (B, E, F), "experts": (E,) | (B, E),
      "trim": {"tau", "top_p", "max_active"}, "force": (B, T, E)}}: pruning simulated by masks,
      run-time trimming (`moe.trim`; build it with `moe_jax.trimming.TrimmingPolicy.masks`), and
      route forcing: "force" lists each token's allowed experts (0/1); the top-k is chosen among
      them (`moe_jax.safety.attacks` forces a top-k set by allowing exactly k experts).
    attention_mask: (B, T) 1 for real tokens (left padding supported).
    segment_ids: (B, T) packed rows: token attends only within its segment (id k > 0 for the
    k-th example of the row, 0 for padding); positions then restart at each segment.
    capture: any of "routing" (logits/scores/idx/weights/active per token), "activations" (per-expert
    sums of |h| and output norms over real tokens: padding and segment id 0 excluded),
    "moe_inputs" (the MoE block's input).
    embed_delta: (B, T, D) added to the token embeddings (input-side attacks, input gradients).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, length) int32, got shape {tokens.shape}")
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids shape {segment_ids.shape} must equal tokens shape {tokens.shape}")
    if embed_delta is not None and tuple(embed_delta.shape) != tokens.shape + (cfg.hidden_size,):
        raise ValueError(f"embed_delta has shape {tuple(embed_delta.shape)}, expected (batch, length, hidden) = "
                         f"{tokens.shape + (cfg.hidden_size,)}")
    logits, aux = _forward(cfg, params, tokens, masks, attention_mask, positions, segment_ids, tuple(capture),
                           impl, embed_delta)
    return (logits, aux) if capture else logits


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
