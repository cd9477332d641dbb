"""What a model costs: parameter counts and bytes from its real widths, generation speed, peak memory.

Separate from the quality measures (moe_jax.evaluation): these need no data, and the pruning
studies and benchmarks call them for compacted models whose quality they measure elsewhere.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import jax
import numpy as np

from moe_jax import timing
from moe_jax.config import ModelConfig
from moe_jax.model import decode, transformer

Params = dict[str, Any]


def model_size(cfg: ModelConfig, params: Params) -> dict[str, Any]:
    """Parameter counts from the real per-expert widths (bucket padding excluded) and stored bytes.

    active_per_token = every non-routed-expert parameter + K/E_l of layer l's routed-expert
    parameters: the expected count a token touches under top-K routing.
    """
    D, K = cfg.hidden_size, cfg.num_experts_per_tok
    stored = transformer.count_params(params)
    routed = padding = 0
    active_routed = 0.0
    for layer in cfg.moe_layers:
        stored_dims, useful_dims = cfg.padded_expert_params(layer)
        experts = params[cfg.layer_name(layer)]["moe"]["experts"]
        held = sum(int(w.size) for w in jax.tree_util.tree_leaves(experts))
        if held != 3 * D * stored_dims:
            raise ValueError(f"model_size: layer {layer} holds {held} routed-expert parameters but the "
                             f"config's widths need {3 * D * stored_dims}; params and config disagree")
        routed += 3 * D * useful_dims
        padding += 3 * D * (stored_dims - useful_dims)
        active_routed += K / cfg.experts_per_layer[layer] * 3 * D * useful_dims
    total = stored - padding
    return {
        "total": total, "routed_experts": routed, "non_expert": total - routed,
        "active_per_token": round(total - routed + active_routed), "stored": stored,
        "bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))),
        "experts_per_layer": [cfg.experts_per_layer[i] for i in cfg.moe_layers],
    }


def throughput(cfg: ModelConfig, params: Params, *, batch_size: int = 8, prompt_len: int = 64,
               new_tokens: int = 32, repeats: int = 3, seed: int = 0, masks: dict | None = None,
               prompts: np.ndarray | None = None, impl: str = "auto") -> dict[str, Any]:
    """Prefill and decode tokens/s of KV-cached greedy generation on random prompts, and peak memory.

    prompts: a (batch_size, prompt_len) token array to use instead of random tokens (routing,
    and so trimming, depends on the text). masks: as in `forward` (pruning or trimming).
    impl: the MoE dispatch path (`moe_jax.model.moe.IMPLS`).

    Prefill time is `generate` with one new token; decode time is the extra time of
    `new_tokens` new tokens (EOS disabled, so every row decodes them all). Medians of
    `repeats` calls after a compiling warm-up.
    """
    if new_tokens < 2 or repeats < 1:
        raise ValueError(f"throughput: need new_tokens >= 2 and repeats >= 1, got {new_tokens}, {repeats}")
    if prompts is None:
        tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch_size, prompt_len), dtype=np.int32)
    else:
        tokens = np.asarray(prompts, np.int32)
        if tokens.shape != (batch_size, prompt_len):
            raise ValueError(f"throughput: prompts have shape {tokens.shape}, expected (batch_size, prompt_len) = "
                             f"{(batch_size, prompt_len)}")
    run = lambda n: decode.generate(cfg, params, tokens, n, eos_id=None, masks=masks, impl=impl)  # noqa: E731
    prefill_s = timing.median_seconds(run, 1, repeats=repeats)
    full_s = timing.median_seconds(run, new_tokens, repeats=repeats)
    decode_s = full_s - prefill_s
    return {
        "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_tokens_per_s": batch_size * prompt_len / prefill_s,
        "decode_tokens_per_s": batch_size * (new_tokens - 1) / decode_s if decode_s > 0 else None,
        "memory": peak_memory(), "device": str(jax.devices()[0].device_kind),
    }


def peak_memory() -> dict[str, Any]:
    """Peak device memory where the backend reports it (GPU/TPU), else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_bytes": int(stats["peak_bytes_in_use"]),
                "source": f"{jax.default_backend()} memory_stats"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_bytes": int(rss if sys.platform == "darwin" else rss * 1024), "source": "process peak RSS"}
