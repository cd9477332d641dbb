"""KV-cached decoding: `init_cache`, one jit-compiled prefill, a `lax.while_loop` of steps.

Prompts of different lengths are left-padded; positions restart at 0 on each row's first
real token, so a batched generation equals generating each prompt alone (and equals
transformers' `generate` with an attention mask). Rows that emit EOS are padded from then
on and the loop stops early when every row is done.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from moe_jax.config import ModelConfig
from moe_jax.model.attention import GQAttention, MLAttention
from moe_jax.model.transformer import apply, default_positions


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> dict:
    """An empty cache: per layer keys/values (GQA) or latents (MLA) for `length` slots."""
    attn = MLAttention if cfg.is_mla else GQAttention
    return {cfg.layer_name(i): attn.empty_cache(cfg, batch, length, dtype) for i in range(cfg.num_layers)}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) arrays of shape (B, width), prompts right-aligned; `width` defaults to the
    longest prompt (pass a bucketed width so many calls share one compiled shape)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs >= 1 token")
    longest = max(len(p) for p in prompts)
    width = longest if width is None else int(width)
    if width < longest:
        raise ValueError(f"left_pad: width {width} is shorter than the longest prompt ({longest})")
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = True
    return tokens, mask


def _sample(logits_BV, rng, temperature: float, top_p: float):
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _without_forced_routes(masks):
    """Route forcing ("force", (B, P, E)) covers the prompt only: decode steps route freely."""
    if not masks:
        return masks
    return {name: ({k: v for k, v in m.items() if k != "force"} if isinstance(m, dict) else m)
            for name, m in masks.items()}


def _constrain_cache(cache: dict, cache_axes) -> dict:
    """Pin the cache's layout on the active mesh (`jax.set_mesh`): batch over `cache_axes[0]`, KV heads
    over `cache_axes[1]` (None: unsplit); MLA latents split over batch only."""
    if cache_axes is None:
        return cache
    batch, heads = cache_axes
    spec = lambda a: PartitionSpec(batch, None, heads, None) if a.ndim == 4 else PartitionSpec(batch, None, None)
    return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, spec(a)), cache)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p", "impl", "cache_axes"))
def generate_arrays(cfg, params, tokens_BP, mask_BP, rng, eos_id, pad_id, masks, *, max_new_tokens, temperature, top_p,
              impl, cache_axes=None):
    """`generate`'s jitted core on arrays: left-padded (B, P) prompts in, (B, max_new_tokens) ids out.

    Sharded decoding (`moe_jax.sharding`) and the benchmarks call it directly to place or lower it.
    """
    B, P = tokens_BP.shape
    S = P + max_new_tokens
    dtype = params["embed"]["embedding"].dtype
    cache = _constrain_cache(init_cache(cfg, B, S, dtype), cache_axes)
    key_valid = jnp.concatenate([mask_BP, jnp.ones((B, max_new_tokens), bool)], axis=1)
    positions = default_positions(mask_BP)
    logits, cache, _ = apply(cfg, params, tokens_BP, positions, jnp.arange(P), key_valid, cache=cache,
                             index=0, masks=masks, impl=impl)
    step_masks = _without_forced_routes(masks)
    next_pos = positions[:, -1] + 1
    rng, sub = jax.random.split(rng)
    first = _sample(logits[:, -1], sub, temperature, top_p)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = first == eos_id

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, out, cache, done, rng, pos = state
        token = out[:, step - 1]
        logits, cache, _ = apply(cfg, params, token[:, None], pos[:, None], (P + step - 1)[None], key_valid,
                                 cache=cache, index=P + step - 1, masks=step_masks, impl=impl)
        cache = _constrain_cache(cache, cache_axes)
        rng, sub = jax.random.split(rng)
        nxt = _sample(logits[:, -1], sub, temperature, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        out = out.at[:, step].set(nxt)
        return step + 1, out, cache, done | (nxt == eos_id), rng, pos + 1

    _, out, _, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, done, rng, next_pos))
    return out


def generate(cfg: ModelConfig, params: dict, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None, eos_id: int | None = None, pad_id: int = 0,
             attention_mask=None, masks: dict | None = None, impl: str = "auto", cache_axes=None) -> np.ndarray:
    """Generate `max_new_tokens` after each prompt; returns (B, max_new_tokens) int32.

    prompts: a list of token lists (any lengths), or a (B, P) array with `attention_mask`
    marking real tokens (left padding). Greedy when temperature == 0, otherwise temperature +
    top-p sampling from `rng`. After a row emits `eos_id` the rest of the row is `pad_id`.
    masks: pruning masks as in `forward` (simulate a plan without recompiling per plan); a
      "force" entry (B, P, E) forces the prompt's routes during prefill only, as Unsafe
      Routes' prefill-stage attack does.
    cache_axes: None, or (batch axes, KV-head axis) of the mesh set by `jax.set_mesh` to keep the KV
      cache sharded on (`moe_jax.sharding.cache_axes` picks them).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(prompts, (list, tuple)) and (len(prompts) == 0 or not np.isscalar(prompts[0])):
        tokens, mask = left_pad([list(map(int, p)) for p in prompts], pad_id)
    else:
        tokens = np.asarray(prompts, np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"prompts must be a list of token lists or a (B, P) array, got shape {tokens.shape}")
        mask = np.ones_like(tokens, bool) if attention_mask is None else np.asarray(attention_mask, bool)
        if (mask[:, :-1] & ~mask[:, 1:]).any():
            raise ValueError("attention_mask must be left-padded (no padding after a real token)")
    if rng is None:
        rng = jax.random.PRNGKey(0)
    eos = -1 if eos_id is None else int(eos_id)
    out = generate_arrays(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), rng, jnp.int32(eos), jnp.int32(pad_id),
                    masks, max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                    impl=impl, cache_axes=cache_axes)
    return np.asarray(out)
