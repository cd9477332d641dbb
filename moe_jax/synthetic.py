"""Random-weight models of real shapes, for benchmarks that need the FLOPs and bytes but no download.

`qwen15_moe_config` builds Qwen1.5-MoE-A2.7B's config through the Hugging Face reader (so the
shape is the one a real checkpoint would get), optionally reduced; `random_params` draws
weights with routers scaled so routing is peaked, as in trained models (random routers are
near-uniform, which hides what trimming and pruning change); `random_model` is the two together,
the one random-model builder of the launchers and benchmarks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.hf import config_json as hf_config
from moe_jax.model import transformer

# config.json of Qwen/Qwen1.5-MoE-A2.7B (the keys the forward pass reads).
QWEN15_MOE_A27B = {
    "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
}
# Overrides a reduced model may take, mapped to their config.json keys.
SIZE_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
             "num_experts": "num_experts", "top_k": "num_experts_per_tok", "expert_width": "moe_intermediate_size",
             "shared_width": "shared_expert_intermediate_size", "vocab_size": "vocab_size",
             "max_position_embeddings": "max_position_embeddings"}


def qwen15_moe_config(*, shared_expert: bool = True, **sizes: int) -> ModelConfig:
    """Qwen1.5-MoE-A2.7B's ModelConfig; `sizes` (keys of `SIZE_KEYS`, 0/None = keep) shrink it;
    `shared_expert=False` drops the shared expert (a model whose routed experts dominate)."""
    unknown = sorted(set(sizes) - set(SIZE_KEYS))
    if unknown:
        raise ValueError(f"qwen15_moe_config: unknown size(s) {unknown}; expected some of {sorted(SIZE_KEYS)}")
    hf = dict(QWEN15_MOE_A27B)
    for name, value in sizes.items():
        if value:
            hf[SIZE_KEYS[name]] = int(value)
    hf["num_key_value_heads"] = hf["num_attention_heads"]
    if not shared_expert:
        hf["shared_expert_intermediate_size"] = 0
    if hf["hidden_size"] % hf["num_attention_heads"]:
        raise ValueError(f"hidden_size={hf['hidden_size']} is not divisible by num_heads={hf['num_attention_heads']}")
    return hf_config.from_hf(hf, source="Qwen1.5-MoE-A2.7B (synthetic)")


def scaled_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.3, dtype: Any = jnp.float32) -> dict:
    """`transformer.init` with every weight matrix at std `scale` instead of 0.02 (padding stays zero),
    so that in tiny random models routing, pruning and masks visibly change the outputs."""
    params = transformer.init(cfg, jax.random.PRNGKey(seed), dtype)
    return jax.tree_util.tree_map(lambda x: x * (scale / 0.02) if x.ndim > 1 else x, params)


def random_params(cfg: ModelConfig, seed: int = 0, dtype: Any = jnp.bfloat16, router_scale: float = 40.0) -> dict:
    """`transformer.init` weights with every router kernel multiplied by `router_scale`.

    On accelerators the draw is one jit-compiled program on the device (numpy would take minutes
    for 14B values); on CPU it is `init`'s numpy draw (XLA's CPU compiler is slow on threefry).
    """
    key = jax.random.PRNGKey(seed)
    if jax.default_backend() == "cpu":
        params = transformer.init(cfg, key, dtype)
    else:
        params = jax.jit(transformer.init, static_argnums=(0, 2))(cfg, key, jnp.dtype(dtype))
    for i in cfg.moe_layers:
        router = params[cfg.layer_name(i)]["moe"]["router"]
        router["kernel"] = router["kernel"] * router_scale
    return params


def random_model(*, seed: int = 0, dtype: Any = jnp.bfloat16, router_scale: float = 40.0, shared_expert: bool = True,
                 **sizes: int) -> tuple[ModelConfig, dict]:
    """(cfg, params): `qwen15_moe_config(shared_expert=..., **sizes)` with `random_params` weights."""
    cfg = qwen15_moe_config(shared_expert=shared_expert, **sizes)
    return cfg, random_params(cfg, seed, dtype, router_scale)
