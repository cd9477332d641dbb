"""Attention for every family: GQA with RoPE, qkv bias and q/k norm, and DeepSeek's MLA.

Both variants work on slots: a forward pass without cache is a cache of length T filled from
slot 0. Keys are masked by causality over slots, by validity (left padding) and by an
optional sliding window, so one code path serves training, scoring, prefill and decode.
MLA caches the compressed latent (kv_lora_rank + rope dims per token), not full keys.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig

_INIT = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
    """RMSNorm in float32, scaled in the input dtype (as the reference implementations)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(x.dtype)


class Linear(nn.Module):
    """y = x @ kernel (+ bias); kernel is (in, out), float32 accumulation."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _INIT, (x.shape[-1], self.features), self.dtype)
        y = jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        return y.astype(kernel.dtype)


# ----------------------------------------------------------------------------- RoPE
def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[jnp.ndarray, float]:
    """Inverse frequencies (rope_dim/2,) and the cos/sin scale for the config's RoPE type."""
    dim = cfg.rope_dim
    base = cfg.rope_theta
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    if cfg.rope_type == "default":
        return inv_freq, 1.0
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor, 1.0
    # YaRN: interpolate low frequencies, keep high ones, blend linearly in between.
    factor = cfg.rope_factor
    if cfg.yarn_attention_factor:
        attention_factor = cfg.yarn_attention_factor
    elif cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
        attention_factor = _yarn_mscale(factor, cfg.yarn_mscale) / _yarn_mscale(factor, cfg.yarn_mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)
    orig = cfg.rope_original_max_position

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.yarn_beta_fast), correction_dim(cfg.yarn_beta_slow)
    if cfg.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where the original (extrapolated) frequency is kept
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    return inv_freq, attention_factor


def rope_cos_sin(cfg: ModelConfig, positions_BT: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape (B, T, rope_dim/2) in float32."""
    inv_freq, scale = rope_frequencies(cfg)
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x_BTHd, cos_BTh, sin_BTh, interleaved: bool):
    """Rotates pairs (i, i + d/2), or adjacent pairs (2i, 2i+1) for DeepSeek's interleaved layout.

    The interleaved form returns its output de-interleaved (evens then odds); queries and
    keys are treated alike, so their dot products equal the reference's.
    """
    dtype = x_BTHd.dtype
    x = x_BTHd.astype(jnp.float32)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(dtype)


# ----------------------------------------------------------------------------- core
def attend(q_BTHd, k_BSGd, v_BSGe, q_slot_T, key_valid_BS, scale: float, window: int | None):
    """Softmax attention over slots with GQA grouping; float32 logits and softmax."""
    B, T, H, _ = q_BTHd.shape
    G = k_BSGd.shape[2]
    S = k_BSGd.shape[1]
    q = q_BTHd.reshape(B, T, G, H // G, -1)
    logits = jnp.einsum("btgqd,bsgd->bgqts", q, k_BSGd, preferred_element_type=jnp.float32) * scale
    k_slot = jnp.arange(S)
    allowed = k_slot[None, :] <= q_slot_T[:, None]
    if window:
        allowed &= k_slot[None, :] > q_slot_T[:, None] - window
    # key_valid is (B, S) validity (padding) or a full (B, T, S) mask (packed segments).
    key_valid_BTS = key_valid_BS if key_valid_BS.ndim == 3 else key_valid_BS[:, None, :]
    allowed = allowed[None] & key_valid_BTS  # (B, T, S)
    logits = jnp.where(allowed[:, None, None], logits, -jnp.inf)
    # A row with no allowed key (a padding query) would be NaN; give it a harmless uniform row.
    logits = jnp.where(allowed.any(-1)[:, None, None, :, None], logits, 0.0)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSGe.dtype)
    out = jnp.einsum("bgqts,bsge->btgqe", probs, v_BSGe, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, -1).astype(v_BSGe.dtype)


def _write(cache_arr, new, index):
    return jax.lax.dynamic_update_slice_in_dim(cache_arr, new.astype(cache_arr.dtype), index, axis=1)


class GQAttention(nn.Module):
    """Grouped-query attention (Mixtral, Qwen2/3-MoE, OLMoE)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, cos, sin, q_slot_T, key_valid_BS, cache=None, index=0):
        cfg, dt = self.cfg, self.dtype
        B, T, _ = x_BTD.shape
        H, G, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = Linear(H * hd, cfg.qkv_bias, dt, name="q_proj")(x_BTD)
        k = Linear(G * hd, cfg.qkv_bias, dt, name="k_proj")(x_BTD)
        v = Linear(G * hd, cfg.qkv_bias, dt, name="v_proj")(x_BTD)
        if cfg.qk_norm == "full":
            q = RMSNorm(cfg.rms_norm_eps, dt, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dt, name="k_norm")(k)
        if cfg.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
        q, k, v = q.reshape(B, T, H, hd), k.reshape(B, T, G, hd), v.reshape(B, T, G, hd)
        if cfg.qk_norm == "head":
            q = RMSNorm(cfg.rms_norm_eps, dt, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dt, name="k_norm")(k)
        q = apply_rope(q, cos, sin, interleaved=False)
        k = apply_rope(k, cos, sin, interleaved=False)
        if cache is not None:
            cache = {"k": _write(cache["k"], k, index), "v": _write(cache["v"], v, index)}
            k, v = cache["k"], cache["v"]
        out = attend(q, k, v, q_slot_T, key_valid_BS, hd**-0.5, cfg.sliding_window)
        y = Linear(cfg.hidden_size, cfg.o_bias, dt, name="o_proj")(out.reshape(B, T, H * hd))
        return y, cache

    @staticmethod
    def empty_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> dict:
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention; caches the normed latent and the rope key."""

    cfg: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, cos, sin, q_slot_T, key_valid_BS, cache=None, index=0):
        cfg, dt = self.cfg, self.dtype
        B, T, _ = x_BTD.shape
        H, nope, rope, vd = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank:
            q = Linear(cfg.q_lora_rank, cfg.qkv_bias, dt, name="q_a_proj")(x_BTD)
            q = RMSNorm(cfg.rms_norm_eps, dt, name="q_a_norm")(q)
            q = Linear(H * (nope + rope), False, dt, name="q_b_proj")(q)
        else:
            q = Linear(H * (nope + rope), False, dt, name="q_proj")(x_BTD)
        q = q.reshape(B, T, H, nope + rope)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        ckv = Linear(cfg.kv_lora_rank + rope, cfg.qkv_bias, dt, name="kv_a_proj")(x_BTD)
        latent = RMSNorm(cfg.rms_norm_eps, dt, name="kv_a_norm")(ckv[..., : cfg.kv_lora_rank])
        k_pe = ckv[..., cfg.kv_lora_rank :].reshape(B, T, 1, rope)
        q_pe = apply_rope(q_pe, cos, sin, interleaved=cfg.rope_interleave)
        k_pe = apply_rope(k_pe, cos, sin, interleaved=cfg.rope_interleave)[:, :, 0]
        if cache is not None:
            cache = {"latent": _write(cache["latent"], latent, index), "k_pe": _write(cache["k_pe"], k_pe, index)}
            latent, k_pe = cache["latent"], cache["k_pe"]
        S = latent.shape[1]
        kv = Linear(H * (nope + vd), False, dt, name="kv_b_proj")(latent).reshape(B, S, H, nope + vd)
        k_nope, v = kv[..., :nope], kv[..., nope:]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None, :], (B, S, H, rope))], axis=-1)
        q = jnp.concatenate([q_nope, q_pe], axis=-1)
        scale = (nope + rope) ** -0.5
        if cfg.rope_type != "default" and cfg.yarn_mscale_all_dim:
            scale *= _yarn_mscale(cfg.rope_factor, cfg.yarn_mscale_all_dim) ** 2
        out = attend(q, k, v, q_slot_T, key_valid_BS, scale, cfg.sliding_window)
        y = Linear(cfg.hidden_size, cfg.o_bias, dt, name="o_proj")(out.reshape(B, T, H * vd))
        return y, cache

    @staticmethod
    def empty_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> dict:
        return {
            "latent": jnp.zeros((batch, length, cfg.kv_lora_rank), dtype),
            "k_pe": jnp.zeros((batch, length, cfg.qk_rope_head_dim), dtype),
        }
