"""Hugging Face config.json <-> ModelConfig, per family.

Each family spells the same idea differently (num_local_experts / num_experts /
n_routed_experts; qkv_bias / attention_bias; mlp_only_layers / first_k_dense_replace). This
module is the one place that knows the spellings. Keys that would change the computation in
a way moe_jax does not implement raise `ConfigError` naming the key; keys that carry no
computation (token ids, training knobs) are kept and written back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from moe_jax.config import FAMILIES, ConfigError, ModelConfig

# config.json keys that carry no information the forward pass needs (training knobs,
# bookkeeping, token ids). They are kept verbatim so `to_hf` can write them back.
_PASSTHROUGH_KEYS = frozenset({
    "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "aux_loss_alpha",
    "seq_aux", "ep_size", "_name_or_path", "tokenizer_class", "num_nextn_predict_layers",
    "num_mtp_layers", "id2label", "label2id", "return_dict", "output_hidden_states",
    "output_attentions", "max_window_layers", "auto_map", "use_return_dict",
    "decoder_start_token_id", "tie_encoder_decoder", "chunk_size_feed_forward", "is_decoder",
    "is_encoder_decoder", "problem_type", "add_cross_attention", "cross_attention_hidden_size",
    "finetuning_task", "prefix", "sep_token_id", "task_specific_params", "torchscript",
    "output_scores", "return_dict_in_generate", "pruned_heads", "tf_legacy_loss", "use_bfloat16",
    "_attn_implementation_autoset", "_commit_hash", "generation_config", "model_max_length",
})

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

# Non-uniform models (expert counts or widths that differ) export with remote code that stock
# transformers loads under trust_remote_code: moe_jax/hf/remote_code/, copied beside the weights.
REMOTE_PREFIX = "moe_jax_"
REMOTE_CONFIG_FILE, REMOTE_MODELING_FILE = "configuration_moe_jax", "modeling_moe_jax"
_REMOTE_NAMES = {"qwen2_moe": "MoeJaxQwen2Moe", "mixtral": "MoeJaxMixtral", "qwen3_moe": "MoeJaxQwen3Moe",
                 "olmoe": "MoeJaxOlmoe", "deepseek_v2": "MoeJaxDeepseekV2", "deepseek_v3": "MoeJaxDeepseekV3"}
REMOTE_CODE_FAMILIES = tuple(_REMOTE_NAMES)  # the families whose remote code is tested


def remote_auto_map(model_type: str) -> dict[str, str]:
    """config.json's auto_map for a non-uniform export of `model_type`."""
    name = _REMOTE_NAMES[model_type]
    return {"AutoConfig": f"{REMOTE_CONFIG_FILE}.{name}Config", "AutoModel": f"{REMOTE_MODELING_FILE}.{name}Model",
            "AutoModelForCausalLM": f"{REMOTE_MODELING_FILE}.{name}ForCausalLM"}


def uses_remote_code(hf: dict[str, Any]) -> bool:
    """True for a config.json whose auto_map points at moe_jax's remote code."""
    auto_map = hf.get("auto_map") or {}
    return isinstance(auto_map, dict) and any(
        str(v).startswith((REMOTE_CONFIG_FILE + ".", REMOTE_MODELING_FILE + ".")) for v in auto_map.values())

# Keys each family's reader consumes (anything else is passthrough, validated or unknown).
_COMMON = {
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "hidden_act", "rope_parameters", "rope_theta", "rope_scaling",
    "num_experts_per_tok", "moe_jax", "partial_rotary_factor", "quantization_config",
}
_FAMILY_KEYS = {
    "mixtral": {"intermediate_size", "num_local_experts", "num_experts", "sliding_window"},
    "qwen2_moe": {"intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "num_experts", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                  "qkv_bias", "use_sliding_window", "sliding_window", "layer_types"},
    "qwen3_moe": {"intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts",
                  "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "attention_bias",
                  "use_sliding_window", "sliding_window", "layer_types"},
    "olmoe": {"intermediate_size", "num_experts", "num_local_experts", "norm_topk_prob",
              "attention_bias", "clip_qkv"},
    "deepseek_v2": {"intermediate_size", "moe_intermediate_size", "n_routed_experts",
                    "n_shared_experts", "first_k_dense_replace", "kv_lora_rank", "q_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "qk_head_dim",
                    "routed_scaling_factor", "topk_method", "n_group", "topk_group",
                    "norm_topk_prob", "attention_bias", "mlp_bias", "moe_layer_freq",
                    "scoring_func", "pretraining_tp", "rope_interleave"},
}
_FAMILY_KEYS["deepseek_v3"] = _FAMILY_KEYS["deepseek_v2"] | {"num_local_experts"}


def _get(hf: dict, key: str, default: Any, source: str) -> Any:
    value = hf.get(key, default)
    if value is None:
        return default
    return value


def _rope(hf: dict, source: str) -> dict[str, Any]:
    """Reads rope_parameters (transformers 5) or rope_theta + rope_scaling (older files)."""
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        if "rope_theta" in hf:
            params.setdefault("rope_theta", hf["rope_theta"])
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if rope_type not in ("default", "linear", "yarn"):
        raise ConfigError(
            f"{source}: rope_parameters.rope_type={rope_type!r} is not implemented "
            "(moe_jax implements 'default', 'linear' and 'yarn')")
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor != 1 is not implemented")
    out["rope_type"] = rope_type
    if rope_type in ("linear", "yarn"):
        if "factor" not in params:
            raise ConfigError(f"{source}: rope_parameters of type {rope_type!r} needs 'factor'")
        out["rope_factor"] = float(params["factor"])
    if rope_type == "yarn":
        if "original_max_position_embeddings" not in params:
            raise ConfigError(f"{source}: yarn rope_parameters need 'original_max_position_embeddings'")
        out["rope_original_max_position"] = int(params["original_max_position_embeddings"])
        out["yarn_beta_fast"] = float(params.get("beta_fast") or 32.0)
        out["yarn_beta_slow"] = float(params.get("beta_slow") or 1.0)
        out["yarn_mscale"] = float(params.get("mscale") or 0.0)
        out["yarn_mscale_all_dim"] = float(params.get("mscale_all_dim") or 0.0)
        out["yarn_attention_factor"] = float(params.get("attention_factor") or 0.0)
        out["yarn_truncate"] = bool(params.get("truncate", True))
    return out


def _layer_kinds_qwen(hf: dict, num_layers: int, num_experts: int) -> tuple[str, ...]:
    step = int(_get(hf, "decoder_sparse_step", 1, ""))
    only = set(_get(hf, "mlp_only_layers", [], ""))
    return tuple(
        "moe" if (i not in only and num_experts > 0 and (i + 1) % step == 0) else "dense"
        for i in range(num_layers)
    )


def from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a Hugging Face `config.json` dict (`source` names it in errors)."""
    hf = dict(hf)
    model_type = hf.get("model_type")
    if isinstance(model_type, str) and model_type.removeprefix(REMOTE_PREFIX) in FAMILIES:
        model_type = model_type.removeprefix(REMOTE_PREFIX)  # a non-uniform export with remote code
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{source}: model_type={model_type!r} is not supported; expected one of {FAMILIES}")
    if hf.get("quantization_config"):
        raise ConfigError(
            f"{source}: quantization_config is set ({hf['quantization_config'].get('quant_method', '?')}); "
            "moe_jax reads unquantised bf16/fp16/fp32 checkpoints only")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act={act!r} is not implemented; expected 'silu'")

    num_layers = int(hf["num_hidden_layers"])
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    kw: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(_get(hf, "num_key_value_heads", num_heads, source)),
        head_dim=int(_get(hf, "head_dim", hidden // num_heads, source)),
        rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6, source)),
        max_position_embeddings=int(_get(hf, "max_position_embeddings", 4096, source)),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False, source)),
        num_experts_per_tok=int(_get(hf, "num_experts_per_tok", 2, source)),
        **_rope(hf, source),
    )
    dense_width = int(_get(hf, "intermediate_size", 0, source))
    shared_width, shared_gate = 0, False

    if model_type == "mixtral":
        num_experts = int(_get(hf, "num_local_experts", hf.get("num_experts", 8), source))
        width = dense_width
        kinds = ("moe",) * num_layers
        kw.update(norm_topk_prob=True, sliding_window=hf.get("sliding_window"))
        dense_width = 0
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        num_experts = int(_get(hf, "num_experts", hf.get("num_local_experts", 60), source))
        width = int(hf["moe_intermediate_size"])
        kinds = _layer_kinds_qwen(hf, num_layers, num_experts)
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not implemented for {model_type}")
        for lt in hf.get("layer_types") or ():
            if lt != "full_attention":
                raise ConfigError(f"{source}: layer_types entry {lt!r} is not implemented")
        kw["norm_topk_prob"] = bool(_get(hf, "norm_topk_prob", False, source))
        if model_type == "qwen2_moe":
            kw["qkv_bias"] = bool(_get(hf, "qkv_bias", True, source))
            shared_width = int(_get(hf, "shared_expert_intermediate_size", 0, source))
            shared_gate = shared_width > 0
        else:
            kw["qkv_bias"] = kw["o_bias"] = bool(_get(hf, "attention_bias", False, source))
            kw["qk_norm"] = "head"
    elif model_type == "olmoe":
        num_experts = int(_get(hf, "num_experts", hf.get("num_local_experts", 64), source))
        width = dense_width
        dense_width = 0
        kinds = ("moe",) * num_layers
        kw.update(
            qkv_bias=bool(_get(hf, "attention_bias", False, source)),
            o_bias=bool(_get(hf, "attention_bias", False, source)),
            qk_norm="full",
            clip_qkv=hf.get("clip_qkv"),
            norm_topk_prob=bool(_get(hf, "norm_topk_prob", False, source)),
        )
    else:  # deepseek_v2 / deepseek_v3
        if int(_get(hf, "moe_layer_freq", 1, source)) != 1:
            raise ConfigError(f"{source}: moe_layer_freq={hf['moe_layer_freq']} is not implemented (expected 1)")
        if hf.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not implemented")
        if int(_get(hf, "pretraining_tp", 1, source)) != 1:
            raise ConfigError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not implemented (expected 1)")
        num_experts = int(_get(hf, "n_routed_experts", hf.get("num_local_experts", 64), source))
        width = int(hf["moe_intermediate_size"])
        first_dense = int(_get(hf, "first_k_dense_replace", 0, source))
        kinds = tuple("dense" if i < first_dense else "moe" for i in range(num_layers))
        shared_width = int(_get(hf, "n_shared_experts", 0, source)) * width
        v3 = model_type == "deepseek_v3"
        scoring = hf.get("scoring_func", "sigmoid" if v3 else "softmax")
        if scoring != ("sigmoid" if v3 else "softmax"):
            raise ConfigError(f"{source}: scoring_func={scoring!r} is not implemented for {model_type}")
        topk_method = "noaux_tc" if v3 else _get(hf, "topk_method", "greedy", source)
        if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(f"{source}: topk_method={topk_method!r} is not implemented")
        n_group = int(_get(hf, "n_group", 1, source)) if topk_method != "greedy" else 1
        kw.update(
            num_kv_heads=num_heads,
            head_dim=int(hf.get("qk_rope_head_dim", 64)),
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=int(hf["kv_lora_rank"]),
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
            qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]),
            rope_interleave=bool(_get(hf, "rope_interleave", True, source)),
            qkv_bias=bool(_get(hf, "attention_bias", False, source)),
            o_bias=bool(_get(hf, "attention_bias", False, source)),
            router_score="sigmoid" if v3 else "softmax",
            router_bias=v3,
            topk_method=topk_method,
            n_group=n_group,
            topk_group=int(_get(hf, "topk_group", 1, source)) if topk_method != "greedy" else 1,
            routed_scaling_factor=float(_get(hf, "routed_scaling_factor", 1.0, source)),
            norm_topk_prob=bool(_get(hf, "norm_topk_prob", v3, source)),
        )

    experts_per_layer = tuple(num_experts if k == "moe" else 0 for k in kinds)
    widths = tuple((width,) * num_experts if k == "moe" else () for k in kinds)
    custom = hf.get("moe_jax") or {}
    if "expert_widths" in custom:  # non-uniform sizes written by moe_jax.hf.save_pretrained
        try:
            kinds = tuple(custom["layer_kinds"])
            widths = tuple(tuple(int(w) for w in ws) for ws in custom["expert_widths"])
            experts_per_layer = tuple(len(ws) for ws in widths)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: key 'moe_jax' is malformed ({e!r}); expected layer_kinds "
                              "and expert_widths lists") from e
    if "shared_expert_width" in custom:
        shared_width = int(custom["shared_expert_width"])
    if "max_width_buckets" in custom:
        kw["max_width_buckets"] = int(custom["max_width_buckets"])

    known = _COMMON | _FAMILY_KEYS[model_type]
    extra = {}
    unknown = []
    for key, value in hf.items():
        if key in known:
            continue
        if key not in _PASSTHROUGH_KEYS:
            unknown.append(key)
        extra[key] = json.dumps(value, sort_keys=True)
    if unknown:
        log.warning("%s: keys not used by moe_jax (kept for save_pretrained): %s", source, sorted(unknown))
    try:
        return ModelConfig(
            dense_intermediate_size=dense_width,
            layer_kinds=kinds,
            experts_per_layer=experts_per_layer,
            expert_widths=widths,
            shared_expert_width=shared_width,
            shared_expert_gate=shared_gate,
            hf_extra=tuple(sorted(extra.items())),
            **kw,
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def _rope_out(cfg: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
    if cfg.rope_type in ("linear", "yarn"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "yarn":
        rope.update(original_max_position_embeddings=cfg.rope_original_max_position,
                    beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow,
                    truncate=cfg.yarn_truncate)
        if cfg.yarn_mscale:
            rope["mscale"] = cfg.yarn_mscale
        if cfg.yarn_mscale_all_dim:
            rope["mscale_all_dim"] = cfg.yarn_mscale_all_dim
        if cfg.yarn_attention_factor:
            rope["attention_factor"] = cfg.yarn_attention_factor
    return rope


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json dict: the stock family's for uniform models; for non-uniform ones a moe_jax
    model_type and auto_map naming the remote code that save_pretrained copies beside the weights."""
    mt = cfg.model_type
    hf: dict[str, Any] = {k: json.loads(v) for k, v in cfg.hf_extra}
    moe = cfg.moe_layers
    num_experts = cfg.max_experts
    width = max((cfg.max_width(i) for i in moe), default=0)
    hf.update(
        model_type=mt,
        architectures=[ARCHITECTURES[mt]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
        num_experts_per_tok=cfg.num_experts_per_tok,
        rope_parameters=_rope_out(cfg),
    )
    dense = [i for i, k in enumerate(cfg.layer_kinds) if k == "dense"]
    exact_shared = True
    if mt in ("mixtral", "olmoe") and dense:
        raise ConfigError(f"{mt} has no dense layers in transformers, but layers {dense} are dense")
    if mt == "mixtral":
        hf.update(intermediate_size=width, num_local_experts=num_experts,
                  sliding_window=cfg.sliding_window, head_dim=cfg.head_dim)
    elif mt in ("qwen2_moe", "qwen3_moe"):
        hf.update(intermediate_size=cfg.dense_intermediate_size or width,
                  moe_intermediate_size=width, num_experts=num_experts,
                  norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                  mlp_only_layers=dense, use_sliding_window=False)
        if mt == "qwen2_moe":
            hf.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=cfg.shared_expert_width)
        else:
            hf.update(attention_bias=cfg.qkv_bias, head_dim=cfg.head_dim)
    elif mt == "olmoe":
        hf.update(intermediate_size=width, num_experts=num_experts, norm_topk_prob=cfg.norm_topk_prob,
                  attention_bias=cfg.qkv_bias, clip_qkv=cfg.clip_qkv)
    else:
        first = len(dense)
        if dense != list(range(first)):
            raise ConfigError(f"{mt} needs its dense layers first; dense layers are {dense}")
        # Stock configs give the shared width as n_shared_experts x moe_intermediate_size; after
        # pruning routed widths that product may not be whole, so moe_jax records it itself.
        exact_shared = bool(width) and cfg.shared_expert_width % width == 0
        hf.update(intermediate_size=cfg.dense_intermediate_size or width, moe_intermediate_size=width,
                  n_routed_experts=num_experts,
                  n_shared_experts=cfg.shared_expert_width // width if exact_shared else 1,
                  first_k_dense_replace=first, kv_lora_rank=cfg.kv_lora_rank,
                  q_lora_rank=cfg.q_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                  qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                  routed_scaling_factor=cfg.routed_scaling_factor,
                  n_group=cfg.n_group, topk_group=cfg.topk_group,
                  norm_topk_prob=cfg.norm_topk_prob, attention_bias=cfg.qkv_bias)
        if mt == "deepseek_v2":
            hf["topk_method"] = cfg.topk_method
        else:
            hf["rope_interleave"] = cfg.rope_interleave
    custom: dict[str, Any] = {}
    # A DeepSeek shared width that is no whole multiple of the routed width cannot be written as
    # stock fields: stock transformers would build the shared expert at the wrong size, so such a
    # model, uniform or not, is exported with the remote code, which reads moe_jax's record.
    odd_shared = mt.startswith("deepseek") and not exact_shared and bool(cfg.shared_expert_width)
    remote = not cfg.is_uniform or odd_shared
    if remote:
        custom.update(layer_kinds=list(cfg.layer_kinds), expert_widths=[list(w) for w in cfg.expert_widths])
    if odd_shared:
        custom["shared_expert_width"] = cfg.shared_expert_width
    if cfg.max_width_buckets != ModelConfig.max_width_buckets:
        custom["max_width_buckets"] = cfg.max_width_buckets
    if custom:
        hf["moe_jax"] = custom
    if uses_remote_code(hf):  # read back from a remote-code export: not ours to keep
        del hf["auto_map"]
    if remote and mt in REMOTE_CODE_FAMILIES:
        _check_remote_routing(cfg)
        hf.update(model_type=REMOTE_PREFIX + mt, architectures=[_REMOTE_NAMES[mt] + "ForCausalLM"],
                  auto_map=remote_auto_map(mt))
    return hf


def _check_remote_routing(cfg: ModelConfig) -> None:
    """Refuses expert counts that break DeepSeek's router groups (ModelConfig refuses them too)."""
    for i in cfg.moe_layers:
        e = cfg.experts_per_layer[i]
        if cfg.topk_method != "greedy" and e % cfg.n_group:
            raise ConfigError(f"{cfg.model_type} layer {i}: {e} experts do not split into n_group={cfg.n_group} "
                              "equal router groups; its router groups cannot be kept")
