"""Configs of moe_jax's non-uniform exports (remote code: imports only transformers).

Each class is the stock family's config under a moe_jax model_type, plus the `moe_jax` entry
that moe_jax.hf.save_pretrained writes: per-layer `layer_kinds` and per-expert `expert_widths`
(and DeepSeek's `shared_expert_width` when it is not n_shared_experts x moe_intermediate_size).
The stock fields keep the largest expert count and width, so the stock layers build as usual.
"""

from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)


class MoeJaxQwen2MoeConfig(Qwen2MoeConfig):
    model_type = "moe_jax_qwen2_moe"
    moe_jax: dict | None = None


class MoeJaxMixtralConfig(MixtralConfig):
    model_type = "moe_jax_mixtral"
    moe_jax: dict | None = None


class MoeJaxQwen3MoeConfig(Qwen3MoeConfig):
    model_type = "moe_jax_qwen3_moe"
    moe_jax: dict | None = None


class MoeJaxOlmoeConfig(OlmoeConfig):
    model_type = "moe_jax_olmoe"
    moe_jax: dict | None = None


class MoeJaxDeepseekV2Config(DeepseekV2Config):
    model_type = "moe_jax_deepseek_v2"
    moe_jax: dict | None = None


class MoeJaxDeepseekV3Config(DeepseekV3Config):
    model_type = "moe_jax_deepseek_v3"
    moe_jax: dict | None = None
