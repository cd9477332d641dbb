"""The key map: where every tensor of every family lives in a Hugging Face checkpoint,
and the dtypes a checkpoint may hold. Loading and saving both read it, so they cannot disagree."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from moe_jax.config import ModelConfig

log = logging.getLogger(__name__)

Params = dict[str, Any]
Path_ = tuple[str, ...]
Placer = Callable[[Path_, np.ndarray], Any]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
LIST_LIMIT = 20


class CheckpointError(ValueError):
    """A checkpoint (or params to save) that cannot be read or written; names the culprit."""


# ====================================================================== the key map
_GUD = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class _FamilyNames:
    """Where a family keeps its MoE block and how it names an expert's projections."""

    moe: str  # MoE block under model.layers.{i}
    expert_proj: tuple[str, str, str]  # gate, up, down
    shared: str | None = None  # shared expert module under the MoE block
    alt_moe: tuple[str, ...] = ()  # other MoE block names accepted on load


FAMILY_NAMES = {
    # transformers 5 renames Mixtral's block_sparse_moe to mlp in memory; fused checkpoints
    # saved from memory use that name.
    "mixtral": _FamilyNames("block_sparse_moe", ("w1", "w3", "w2"), alt_moe=("mlp",)),
    "qwen2_moe": _FamilyNames("mlp", _GUD, shared="shared_expert"),
    "qwen3_moe": _FamilyNames("mlp", _GUD),
    "olmoe": _FamilyNames("mlp", _GUD),
    "deepseek_v2": _FamilyNames("mlp", _GUD, shared="shared_experts"),
    "deepseek_v3": _FamilyNames("mlp", _GUD, shared="shared_experts"),
}

# Our module under layer_{i} -> HF module under model.layers.{i} ("{moe}"/"{shared}" come from
# FAMILY_NAMES). `_layer_modules` decides which rows a layer has, and their shapes.
_LAYER_KEYS = {
    "input_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "attn/q_proj": "self_attn.q_proj",
    "attn/k_proj": "self_attn.k_proj",
    "attn/v_proj": "self_attn.v_proj",
    "attn/o_proj": "self_attn.o_proj",
    "attn/q_norm": "self_attn.q_norm",
    "attn/k_norm": "self_attn.k_norm",
    "attn/q_a_proj": "self_attn.q_a_proj",
    "attn/q_a_norm": "self_attn.q_a_layernorm",
    "attn/q_b_proj": "self_attn.q_b_proj",
    "attn/kv_a_proj": "self_attn.kv_a_proj_with_mqa",
    "attn/kv_a_norm": "self_attn.kv_a_layernorm",
    "attn/kv_b_proj": "self_attn.kv_b_proj",
    "mlp/gate_proj": "mlp.gate_proj",
    "mlp/up_proj": "mlp.up_proj",
    "mlp/down_proj": "mlp.down_proj",
    "moe/router": "{moe}.gate",
    "moe/score_bias": "{moe}.gate.e_score_correction_bias",  # a bare tensor, not a module
    "moe/shared/gate_proj": "{moe}.{shared}.gate_proj",
    "moe/shared/up_proj": "{moe}.{shared}.up_proj",
    "moe/shared/down_proj": "{moe}.{shared}.down_proj",
    "moe/shared_gate": "{moe}.shared_expert_gate",
}
_TOP_KEYS = {"embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}
_EXPERT_KEY = "model.layers.{i}.{moe}.experts.{e}.{proj}.weight"
FUSED_GATE_UP = "model.layers.{i}.{moe}.experts.gate_up_proj"  # (E, 2F, D), gate rows first
FUSED_DOWN = "model.layers.{i}.{moe}.experts.down_proj"  # (E, D, F)
PARTS = ("gate", "up", "down")
_FLOAT32_MODULES = ("moe/router", "moe/score_bias")
IGNORED_KEY = re.compile(r"\.rotary_emb\.inv_freq$")
LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class _Module:
    """One row of the key map for a given layer: kind, HF weight shape, whether it has a bias."""

    name: str  # our module path, "/"-separated
    kind: str  # "linear" (HF (out, in) -> kernel (in, out)), "norm" (-> scale), "vector", "embed"
    hf_shape: tuple[int, ...]
    bias: bool = False


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor and where it goes in our tree."""

    hf_key: str
    path: Path_
    hf_shape: tuple[int, ...]
    transpose: bool
    float32: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.hf_shape[::-1] if self.transpose else self.hf_shape


def _attn_modules(cfg: ModelConfig) -> list[_Module]:
    d, h = cfg.hidden_size, cfg.num_heads
    if cfg.is_mla:
        qk, rope = cfg.qk_head_dim, cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            r = int(cfg.q_lora_rank)
            q = [_Module("attn/q_a_proj", "linear", (r, d), cfg.qkv_bias),
                 _Module("attn/q_a_norm", "norm", (r,)),
                 _Module("attn/q_b_proj", "linear", (h * qk, r))]
        else:
            q = [_Module("attn/q_proj", "linear", (h * qk, d))]
        return q + [
            _Module("attn/kv_a_proj", "linear", (cfg.kv_lora_rank + rope, d), cfg.qkv_bias),
            _Module("attn/kv_a_norm", "norm", (cfg.kv_lora_rank,)),
            _Module("attn/kv_b_proj", "linear",
                    (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)),
            _Module("attn/o_proj", "linear", (d, h * cfg.v_head_dim), cfg.o_bias),
        ]
    hd, kv = cfg.head_dim, cfg.num_kv_heads
    mods = [_Module("attn/q_proj", "linear", (h * hd, d), cfg.qkv_bias),
            _Module("attn/k_proj", "linear", (kv * hd, d), cfg.qkv_bias),
            _Module("attn/v_proj", "linear", (kv * hd, d), cfg.qkv_bias),
            _Module("attn/o_proj", "linear", (d, h * hd), cfg.o_bias)]
    if cfg.qk_norm == "head":
        mods += [_Module("attn/q_norm", "norm", (hd,)), _Module("attn/k_norm", "norm", (hd,))]
    elif cfg.qk_norm == "full":
        mods += [_Module("attn/q_norm", "norm", (h * hd,)), _Module("attn/k_norm", "norm", (kv * hd,))]
    return mods


def _ffn_modules(cfg: ModelConfig, layer: int) -> list[_Module]:
    """Dense MLP, or the MoE block without its routed experts."""
    d = cfg.hidden_size
    if cfg.layer_kinds[layer] == "dense":
        f = cfg.dense_intermediate_size
        return [_Module("mlp/gate_proj", "linear", (f, d)), _Module("mlp/up_proj", "linear", (f, d)),
                _Module("mlp/down_proj", "linear", (d, f))]
    e = cfg.experts_per_layer[layer]
    mods = [_Module("moe/router", "linear", (e, d))]
    if cfg.router_bias:
        mods.append(_Module("moe/score_bias", "vector", (e,)))
    s = cfg.shared_expert_width
    if s:
        mods += [_Module("moe/shared/gate_proj", "linear", (s, d)),
                 _Module("moe/shared/up_proj", "linear", (s, d)),
                 _Module("moe/shared/down_proj", "linear", (d, s))]
    if cfg.shared_expert_gate:
        mods.append(_Module("moe/shared_gate", "linear", (1, d)))
    return mods


def _layer_modules(cfg: ModelConfig, layer: int) -> list[_Module]:
    d = cfg.hidden_size
    norms = [_Module("input_norm", "norm", (d,)), _Module("post_attn_norm", "norm", (d,))]
    return norms + _attn_modules(cfg) + _ffn_modules(cfg, layer)


def _module_tensors(mod: _Module, hf_module: str, path: Path_) -> list[Tensor]:
    f32 = mod.name in _FLOAT32_MODULES
    if mod.kind == "linear":
        out = [Tensor(f"{hf_module}.weight", path + ("kernel",), mod.hf_shape, True, f32)]
        if mod.bias:
            out.append(Tensor(f"{hf_module}.bias", path + ("bias",), mod.hf_shape[:1], False, f32))
        return out
    if mod.kind == "norm":
        return [Tensor(f"{hf_module}.weight", path + ("scale",), mod.hf_shape, False)]
    if mod.kind == "embed":
        return [Tensor(f"{hf_module}.weight", path + ("embedding",), mod.hf_shape, False)]
    return [Tensor(hf_module, path, mod.hf_shape, False, f32)]  # "vector": the key is the tensor


def _moe_block(cfg: ModelConfig, moe_names: Mapping[int, str] | None, layer: int) -> str:
    if moe_names and layer in moe_names:
        return moe_names[layer]
    return FAMILY_NAMES[cfg.model_type].moe


def tensors(cfg: ModelConfig, moe_names: Mapping[int, str] | None = None) -> list[Tensor]:
    """Every tensor except the routed experts, in tree order."""
    fam = FAMILY_NAMES[cfg.model_type]
    d, v = cfg.hidden_size, cfg.vocab_size
    out = _module_tensors(_Module("embed", "embed", (v, d)), _TOP_KEYS["embed"], ("embed",))
    for i in range(cfg.num_layers):
        moe = _moe_block(cfg, moe_names, i)
        for mod in _layer_modules(cfg, i):
            hf = f"model.layers.{i}." + _LAYER_KEYS[mod.name].format(moe=moe, shared=fam.shared)
            out += _module_tensors(mod, hf, (cfg.layer_name(i),) + tuple(mod.name.split("/")))
    out += _module_tensors(_Module("final_norm", "norm", (d,)), _TOP_KEYS["final_norm"], ("final_norm",))
    if not cfg.tie_word_embeddings:
        out += _module_tensors(_Module("lm_head", "linear", (v, d)), _TOP_KEYS["lm_head"], ("lm_head",))
    return out


def expert_keys(cfg: ModelConfig, layer: int, expert: int, moe: str | None = None) -> dict[str, tuple]:
    """{part: (HF key, HF shape)} of one routed expert, at its own width."""
    fam = FAMILY_NAMES[cfg.model_type]
    d, f = cfg.hidden_size, cfg.expert_widths[layer][expert]
    shapes = {"gate": (f, d), "up": (f, d), "down": (d, f)}
    return {
        part: (_EXPERT_KEY.format(i=layer, moe=moe or fam.moe, e=expert, proj=proj), shapes[part])
        for part, proj in zip(PARTS, fam.expert_proj)
    }


def _bucket_shapes(cfg: ModelConfig, layer: int) -> dict[Path_, tuple[int, ...]]:
    d, out = cfg.hidden_size, {}
    for b, bucket in enumerate(cfg.expert_buckets(layer)):
        n, f = len(bucket.expert_ids), bucket.width
        base = (cfg.layer_name(layer), "moe", "experts", f"bucket_{b}")
        out.update({base + ("gate",): (n, d, f), base + ("up",): (n, d, f), base + ("down",): (n, f, d)})
    return out


def expected_param_shapes(cfg: ModelConfig) -> dict[Path_, tuple[int, ...]]:
    """Every leaf path of the params tree `cfg` describes, with its shape (layout.py's tree)."""
    shapes = {t.path: t.shape for t in tensors(cfg)}
    for i in cfg.moe_layers:
        shapes.update(_bucket_shapes(cfg, i))
    return shapes


def hf_key_map(cfg: ModelConfig) -> dict[str, Path_ | tuple[Path_, int, str]]:
    """HF key (per-expert layout, as `save_pretrained` writes) -> our path.

    Routed experts map to (bucket path, row in bucket, part); the value sits in the bucket's
    row at its own width (the rest is padding).
    """
    out: dict[str, Any] = {t.hf_key: t.path for t in tensors(cfg)}
    for i in cfg.moe_layers:
        for b, bucket in enumerate(cfg.expert_buckets(i)):
            base = (cfg.layer_name(i), "moe", "experts", f"bucket_{b}")
            for j, e in enumerate(bucket.expert_ids):
                for part, (key, _) in expert_keys(cfg, i, e).items():
                    out[key] = (base + (part,), j, part)
    return out


# ====================================================================== dtypes
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16",
                  "float": "float32", "fp64": "float64", "double": "float64"}
_FLOAT_DTYPES = {
    "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16), "float64": np.dtype(np.float64),
}
FILE_DTYPES = {"F32", "BF16", "F16", "F64"}


def as_dtype(dtype: Any) -> np.dtype:
    """numpy dtype of `dtype` given as a string, numpy/ml_dtypes/jax dtype or scalar type."""
    try:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    except TypeError:  # e.g. a torch dtype: its str() is "torch.bfloat16"
        name = str(dtype)
    name = name.lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in _FLOAT_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of {sorted(_FLOAT_DTYPES)}")
    return _FLOAT_DTYPES[name]


def short_list(items: Iterable[str], limit: int = LIST_LIMIT) -> str:
    """`items` sorted, at most `limit` of them shown, for error messages."""
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def convert(arr: np.ndarray, transpose: bool, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous copy in `dtype`, transposed if asked, in one pass."""
    return (arr.T if transpose else arr).astype(dtype, order="C")
