"""Hugging Face safetensors checkpoints <-> (ModelConfig, params), for the six families.

`load_pretrained` reads `config.json` and `model.safetensors` (or a sharded index) into the
tree of `moe_jax.model.layout`; `save_pretrained` writes per-expert keys that stock
transformers loads (uniform models) and that `load_pretrained` reads back (any model: expert
sizes then travel in config.json under ``moe_jax``).

Why it is built this way:
- One key map (`_FAMILY_NAMES`, `_LAYER_KEYS`) says where every tensor of every family lives;
  which rows a layer uses follows from the config, so loading and saving cannot disagree.
- Every key, shape and dtype is checked from the safetensors headers before any tensor data
  is read, so a bad checkpoint fails fast, with the key, file and shapes named.
- Tensors are read, converted and placed one at a time; experts are written straight into
  their preallocated width bucket. Peak host memory is about one copy of the weights in the
  target dtype plus one layer's buckets, never the whole checkpoint in float32.
- The router kernel and DeepSeek-V3's score bias stay float32 whatever `dtype` says (router
  maths is float32; transformers keeps `e_score_correction_bias` float32 too). They are tiny.
- A save writes into a temporary directory beside `out_dir` and renames it at the end, so a
  failed or interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from moe_jax.config import ModelConfig

log = logging.getLogger(__name__)

Params = dict[str, Any]
Path_ = tuple[str, ...]
Placer = Callable[[Path_, np.ndarray], Any]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
_LIST_LIMIT = 20


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


_FAMILY_NAMES = {
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
# _FAMILY_NAMES). `_layer_modules` decides which rows a layer has, and their shapes.
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
_FUSED_GATE_UP = "model.layers.{i}.{moe}.experts.gate_up_proj"  # (E, 2F, D), gate rows first
_FUSED_DOWN = "model.layers.{i}.{moe}.experts.down_proj"  # (E, D, F)
_PARTS = ("gate", "up", "down")
_FLOAT32_MODULES = ("moe/router", "moe/score_bias")
_IGNORED_KEY = re.compile(r"\.rotary_emb\.inv_freq$")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class _Module:
    """One row of the key map for a given layer: kind, HF weight shape, whether it has a bias."""

    name: str  # our module path, "/"-separated
    kind: str  # "linear" (HF (out, in) -> kernel (in, out)), "norm" (-> scale), "vector", "embed"
    hf_shape: tuple[int, ...]
    bias: bool = False


@dataclasses.dataclass(frozen=True)
class _Tensor:
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


def _module_tensors(mod: _Module, hf_module: str, path: Path_) -> list[_Tensor]:
    f32 = mod.name in _FLOAT32_MODULES
    if mod.kind == "linear":
        out = [_Tensor(f"{hf_module}.weight", path + ("kernel",), mod.hf_shape, True, f32)]
        if mod.bias:
            out.append(_Tensor(f"{hf_module}.bias", path + ("bias",), mod.hf_shape[:1], False, f32))
        return out
    if mod.kind == "norm":
        return [_Tensor(f"{hf_module}.weight", path + ("scale",), mod.hf_shape, False)]
    if mod.kind == "embed":
        return [_Tensor(f"{hf_module}.weight", path + ("embedding",), mod.hf_shape, False)]
    return [_Tensor(hf_module, path, mod.hf_shape, False, f32)]  # "vector": the key is the tensor


def _moe_block(cfg: ModelConfig, moe_names: Mapping[int, str] | None, layer: int) -> str:
    if moe_names and layer in moe_names:
        return moe_names[layer]
    return _FAMILY_NAMES[cfg.model_type].moe


def _tensors(cfg: ModelConfig, moe_names: Mapping[int, str] | None = None) -> list[_Tensor]:
    """Every tensor except the routed experts, in tree order."""
    fam = _FAMILY_NAMES[cfg.model_type]
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


def _expert_keys(cfg: ModelConfig, layer: int, expert: int, moe: str | None = None) -> dict[str, tuple]:
    """{part: (HF key, HF shape)} of one routed expert, at its own width."""
    fam = _FAMILY_NAMES[cfg.model_type]
    d, f = cfg.hidden_size, cfg.expert_widths[layer][expert]
    shapes = {"gate": (f, d), "up": (f, d), "down": (d, f)}
    return {
        part: (_EXPERT_KEY.format(i=layer, moe=moe or fam.moe, e=expert, proj=proj), shapes[part])
        for part, proj in zip(_PARTS, fam.expert_proj)
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
    shapes = {t.path: t.shape for t in _tensors(cfg)}
    for i in cfg.moe_layers:
        shapes.update(_bucket_shapes(cfg, i))
    return shapes


def hf_key_map(cfg: ModelConfig) -> dict[str, Path_ | tuple[Path_, int, str]]:
    """HF key (per-expert layout, as `save_pretrained` writes) -> our path.

    Routed experts map to (bucket path, row in bucket, part); the value sits in the bucket's
    row at its own width (the rest is padding).
    """
    out: dict[str, Any] = {t.hf_key: t.path for t in _tensors(cfg)}
    for i in cfg.moe_layers:
        for b, bucket in enumerate(cfg.expert_buckets(i)):
            base = (cfg.layer_name(i), "moe", "experts", f"bucket_{b}")
            for j, e in enumerate(bucket.expert_ids):
                for part, (key, _) in _expert_keys(cfg, i, e).items():
                    out[key] = (base + (part,), j, part)
    return out


# ====================================================================== dtypes
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16",
                  "float": "float32", "fp64": "float64", "double": "float64"}
_FLOAT_DTYPES = {
    "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16), "float64": np.dtype(np.float64),
}
_FILE_DTYPES = {"F32", "BF16", "F16", "F64"}


def _as_dtype(dtype: Any) -> np.dtype:
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


# ====================================================================== reading
def _read_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a checkpoint directory needs {CONFIG_NAME}")
    try:
        hf = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(hf).__name__}")
    return ModelConfig.from_hf_config(hf, source=str(file)), hf


def _names(items: Iterable[str], limit: int = _LIST_LIMIT) -> str:
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class _Checkpoint:
    """The safetensors files of one checkpoint, opened once; key -> file from headers only."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        self.path = path
        self._handles: dict[str, Any] = {}
        self._stack = stack
        single, index = path / WEIGHTS_NAME, path / INDEX_NAME
        if single.is_file():
            self.file_of = {k: WEIGHTS_NAME for k in self._open(WEIGHTS_NAME).keys()}
        elif index.is_file():
            self.file_of = self._read_index(index)
        else:
            raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} (only safetensors "
                                  "checkpoints are supported)")

    def _open(self, name: str) -> Any:
        if name not in self._handles:
            file = self.path / name
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (named in {INDEX_NAME})")
            try:
                self._handles[name] = self._stack.enter_context(safe_open(str(file), framework="numpy"))
            except Exception as e:  # SafetensorError is not exported as a class
                raise CheckpointError(f"{file}: not a readable safetensors file "
                                      f"(truncated or corrupt?): {e}") from e
        return self._handles[name]

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid index, expected {{'weight_map': {{key: file}}}} "
                                  f"({e!r})") from e
        for name in sorted(set(weight_map.values())):
            held = set(self._open(name).keys())
            absent = [k for k, f in weight_map.items() if f == name and k not in held]
            if absent:
                raise CheckpointError(f"{index} names {len(absent)} tensor(s) in {self.path / name} that "
                                      f"the file does not hold: {_names(absent)}")
        return dict(weight_map)

    def keys(self) -> set[str]:
        return set(self.file_of)

    def where(self, key: str) -> Path:
        return self.path / self.file_of[key]

    def _slice(self, key: str) -> Any:
        return self._open(self.file_of[key]).get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return str(self._slice(key).get_dtype())

    def get(self, key: str) -> np.ndarray:
        return self._open(self.file_of[key]).get_tensor(key)

    def get_row(self, key: str, row: int) -> np.ndarray:
        """Row `row` of a stacked tensor, reading only that row."""
        return self._slice(key)[row]


@dataclasses.dataclass
class _Plan:
    """What to read: the non-expert tensors and, per MoE layer, where its experts live."""

    tensors: list[_Tensor]
    moe_names: dict[int, str]
    fused: dict[int, bool]


def _choose_moe_names(cfg: ModelConfig, keys: set[str]) -> dict[int, str]:
    fam = _FAMILY_NAMES[cfg.model_type]
    names = {}
    for i in cfg.moe_layers:
        names[i] = next((m for m in (fam.moe,) + fam.alt_moe if f"model.layers.{i}.{m}.gate.weight" in keys),
                        fam.moe)
    return names


def _expected_experts(cfg: ModelConfig, plan: _Plan) -> dict[str, tuple[int, ...]]:
    """HF key -> shape of every routed-expert tensor, fused or per expert as the plan says."""
    expected = {}
    d = cfg.hidden_size
    for i in cfg.moe_layers:
        moe = plan.moe_names[i]
        gate_up = _FUSED_GATE_UP.format(i=i, moe=moe)
        widths = cfg.expert_widths[i]
        if plan.fused[i]:
            if len(set(widths)) != 1:
                raise CheckpointError(f"{gate_up}: fused experts have one width, but the config gives "
                                      f"layer {i} experts of widths {sorted(set(widths))}")
            e, f = len(widths), widths[0]
            expected[gate_up] = (e, 2 * f, d)
            expected[_FUSED_DOWN.format(i=i, moe=moe)] = (e, d, f)
        else:
            for e in range(len(widths)):
                expected.update(dict(_expert_keys(cfg, i, e, moe).values()))
    return expected


def _ignorable(cfg: ModelConfig, key: str) -> bool:
    if _IGNORED_KEY.search(key):
        return True
    if cfg.tie_word_embeddings and key == "lm_head.weight":
        return True
    return False


def _mtp_keys(cfg: ModelConfig, keys: Iterable[str]) -> list[str]:
    """Keys of layers past num_hidden_layers (DeepSeek-V3 multi-token-prediction layers)."""
    out = []
    for key in keys:
        m = _LAYER_INDEX.match(key)
        if m and int(m.group(1)) >= cfg.num_layers:
            out.append(key)
    return out


def _plan(cfg: ModelConfig, ckpt: _Checkpoint, strict: bool) -> _Plan:
    """Checks names, shapes and dtypes against the config from headers alone, then says what to read."""
    keys = ckpt.keys()
    moe_names = _choose_moe_names(cfg, keys)
    fused = {i: _FUSED_GATE_UP.format(i=i, moe=moe_names[i]) in keys for i in cfg.moe_layers}
    plan = _Plan(_tensors(cfg, moe_names), moe_names, fused)
    expected = {t.hf_key: t.hf_shape for t in plan.tensors}
    expected.update(_expected_experts(cfg, plan))

    missing = [k for k in expected if k not in keys]
    mtp = _mtp_keys(cfg, keys)
    if mtp:
        log.info("%s: skipping %d tensors of layers >= num_hidden_layers=%d (multi-token prediction)",
                 ckpt.path, len(mtp), cfg.num_layers)
    unused = sorted(keys - set(expected) - set(mtp) - {k for k in keys if _ignorable(cfg, k)})
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) missing: {_names(missing)}")
    if unused and strict:
        problems.append(f"{len(unused)} weight(s) in the checkpoint not used by the config "
                        f"(strict=True): {_names(unused)}")
    if problems:
        raise CheckpointError(f"{ckpt.path}: " + "; ".join(problems))
    if unused:
        log.warning("%s: ignoring %d unused weight(s): %s", ckpt.path, len(unused), _names(unused))

    bad = []
    for key, shape in expected.items():
        found = ckpt.shape(key)
        if found != tuple(shape):
            bad.append(f"{key} in {ckpt.where(key).name} has shape {found}, expected {tuple(shape)}")
        elif ckpt.dtype(key) not in _FILE_DTYPES:
            bad.append(f"{key} in {ckpt.where(key).name} has dtype {ckpt.dtype(key)}, expected one of "
                       f"{sorted(_FILE_DTYPES)} (quantised checkpoints are not supported)")
    if bad:
        raise CheckpointError(f"{ckpt.path}: {len(bad)} tensor(s) do not match the config: "
                              + "; ".join(bad[:_LIST_LIMIT]) + (" ..." if len(bad) > _LIST_LIMIT else ""))
    return plan


def _convert(arr: np.ndarray, transpose: bool, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous copy in `dtype`, transposed if asked, in one pass."""
    return (arr.T if transpose else arr).astype(dtype, order="C")


def _set(tree: Params, path: Path_, value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _read_experts(cfg: ModelConfig, ckpt: _Checkpoint, plan: _Plan, layer: int,
                  dtype: np.dtype) -> Iterator[tuple[Path_, np.ndarray]]:
    """Each bucket array of a layer, filled expert by expert in place (zero beyond a width)."""
    moe, d = plan.moe_names[layer], cfg.hidden_size
    for b, bucket in enumerate(cfg.expert_buckets(layer)):
        for part in _PARTS:
            n, fb = len(bucket.expert_ids), bucket.width
            out = np.zeros((n, fb, d) if part == "down" else (n, d, fb), dtype)
            for j, e in enumerate(bucket.expert_ids):
                f = cfg.expert_widths[layer][e]
                if not plan.fused[layer]:
                    w = ckpt.get(_expert_keys(cfg, layer, e, moe)[part][0])  # (F, D) or down (D, F)
                elif part == "down":
                    w = ckpt.get_row(_FUSED_DOWN.format(i=layer, moe=moe), e)  # (D, F)
                else:
                    w = ckpt.get_row(_FUSED_GATE_UP.format(i=layer, moe=moe), e)  # (2F, D)
                    w = w[:f] if part == "gate" else w[f:]
                if part == "down":
                    out[j, :f, :] = w.T
                else:
                    out[j, :, :f] = w.T
                del w
            yield (cfg.layer_name(layer), "moe", "experts", f"bucket_{b}", part), out


def _default_place(path: Path_, arr: np.ndarray) -> Any:
    import jax.numpy as jnp

    return jnp.asarray(arr)


def load_pretrained(
    path: str | os.PathLike,
    dtype: Any = "bfloat16",
    *,
    strict: bool = True,
    place: Placer | None = None,
) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) from a Hugging Face checkpoint directory.

    `dtype`: target dtype of the weights (string, numpy/jax dtype; None = config.json's dtype).
    `strict`: checkpoint tensors the config does not use are an error (else a warning); missing
    tensors are always an error. `place(path, array)` turns each finished numpy array into the
    stored leaf (default `jnp.asarray`; pass a sharded `jax.device_put` for big models, or
    `lambda p, a: a` to keep numpy); it is called once per tensor, so memory stays flat.
    """
    root = Path(path)
    cfg, hf = _read_config(root)
    if dtype is None:
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    target = _as_dtype(dtype)
    place = place or _default_place
    params: Params = {}
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(root, stack)
        plan = _plan(cfg, ckpt, strict)
        for t in plan.tensors:
            arr = _convert(ckpt.get(t.hf_key), t.transpose, np.dtype(np.float32) if t.float32 else target)
            _set(params, t.path, place(t.path, arr))
            del arr
        for i in cfg.moe_layers:
            for p, arr in _read_experts(cfg, ckpt, plan, i, target):
                _set(params, p, place(p, arr))
                del arr
    return cfg, params


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The `tokenizers.Tokenizer` of a checkpoint directory, or None if it has no tokenizer.json."""
    file = Path(path) / TOKENIZER_NAME
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own Exception type
        raise CheckpointError(f"{file}: not a readable tokenizer ({e})") from e


# ====================================================================== writing
@dataclasses.dataclass(frozen=True)
class _Out:
    """One tensor to write: its key, size, and how to produce it (HF layout, target dtype)."""

    hf_key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _leaves(tree: Any, prefix: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaves(v, prefix + (str(k),))
    else:
        yield prefix, tree


def _check_params(cfg: ModelConfig, params: Params) -> dict[Path_, Any]:
    """The leaves of `params`, after checking that they are exactly the tree `cfg` describes."""
    expected = expected_param_shapes(cfg)
    leaves = dict(_leaves(params))
    fmt = "/".join
    missing = [fmt(p) for p in expected if p not in leaves]
    unexpected = [fmt(p) for p in leaves if p not in expected]
    wrong = [f"{fmt(p)} has shape {tuple(np.shape(leaves[p]))}, expected {s}"
             for p, s in expected.items() if p in leaves and tuple(np.shape(leaves[p])) != s]
    problems = []
    if missing:
        problems.append(f"{len(missing)} param(s) missing: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} param(s) the config does not describe: {_names(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} param(s) with the wrong shape: " + "; ".join(wrong[:_LIST_LIMIT]))
    if problems:
        raise CheckpointError("params do not match the config: " + "; ".join(problems))
    return leaves


def _dtype_of(leaf: Any) -> np.dtype:
    return np.dtype(leaf.dtype)


def _to_hf(leaf: Any, transpose: bool, dtype: np.dtype) -> np.ndarray:
    return _convert(np.asarray(leaf), transpose, dtype)


def _expert_part(leaf: Any, row: int, width: int, part: str, dtype: np.dtype, key: str) -> np.ndarray:
    """One expert's HF weight (out, in) from its bucket row; the padding must be zero."""
    w = np.asarray(leaf[row])  # gate/up (D, F_b), down (F_b, D)
    keep, pad = (w[:width], w[width:]) if part == "down" else (w[:, :width], w[:, width:])
    if pad.size and np.any(pad != 0):
        raise CheckpointError(f"{key}: the bucket holds non-zero values beyond the expert's width "
                              f"{width}; the config's expert_widths do not match the params")
    return _convert(keep, True, dtype)


def _outputs(cfg: ModelConfig, leaves: dict[Path_, Any], dtype: np.dtype | None) -> list[_Out]:
    """Every tensor to write, layer by layer (a layer's experts follow its other tensors)."""

    def out_dtype(leaf: Any, path: Path_) -> np.dtype:
        if dtype is None:
            return _dtype_of(leaf)
        if path[-1] == "score_bias" and _dtype_of(leaf) == np.float32:
            return np.dtype(np.float32)  # transformers keeps e_score_correction_bias float32 too
        return dtype

    groups: dict[str, list[_Out]] = {}
    for t in _tensors(cfg):
        leaf, d = leaves[t.path], out_dtype(leaves[t.path], t.path)
        make = functools.partial(_to_hf, leaf, t.transpose, d)
        groups.setdefault(t.path[0], []).append(_Out(t.hf_key, t.hf_shape, d, make))
    for i in cfg.moe_layers:
        for b, bucket in enumerate(cfg.expert_buckets(i)):
            base = (cfg.layer_name(i), "moe", "experts", f"bucket_{b}")
            for j, e in enumerate(bucket.expert_ids):
                width = cfg.expert_widths[i][e]
                for part, (key, shape) in _expert_keys(cfg, i, e).items():
                    leaf = leaves[base + (part,)]
                    d = out_dtype(leaf, base + (part,))
                    make = functools.partial(_expert_part, leaf, j, width, part, d, key)
                    groups[cfg.layer_name(i)].append(_Out(key, shape, d, make))
    return [o for group in groups.values() for o in group]


def _shard(outs: list[_Out], max_bytes: int) -> list[list[_Out]]:
    """Consecutive groups of at most max_bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[_Out]] = [[]]
    size = 0
    for o in outs:
        if shards[-1] and size + o.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    return shards


def _fsync(file: Path) -> None:
    with open(file, "rb") as fh:
        os.fsync(fh.fileno())


def _write(tmp: Path, hf_cfg: dict[str, Any], shards: list[list[_Out]], extra_files: list[Path]) -> None:
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file({o.hf_key: o.make() for o in shard}, str(tmp / name), metadata={"format": "pt"})
        _fsync(tmp / name)
        weight_map.update({o.hf_key: name for o in shard})
    if len(shards) > 1:
        total = sum(o.nbytes for shard in shards for o in shard)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    for f in extra_files:
        shutil.copy2(f, tmp / f.name)


def save_pretrained(
    cfg: ModelConfig,
    params: Params,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 2**30,
    dtype: Any = None,
    overwrite: bool = False,
    extra_files: Iterable[str | os.PathLike] = (),
) -> Path:
    """Writes a Hugging Face checkpoint (config.json + safetensors) of `params`; returns out_dir.

    Experts are written one key each at their own width, so uniform models load in stock
    transformers and non-uniform ones round-trip through `load_pretrained`. `dtype` None keeps
    each tensor's dtype. `extra_files` (tokenizer files, ...) are copied in. Everything is
    checked first and written to a temporary directory renamed at the end: on failure nothing
    is left. An existing non-empty `out_dir` is an error unless `overwrite`.
    """
    out = Path(out_dir)
    hf_cfg = cfg.to_hf_config()  # ConfigError for configs no config.json can express
    leaves = _check_params(cfg, params)
    target = _as_dtype(dtype) if dtype is not None else None
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    extras = [Path(f) for f in extra_files]
    for f in extras:
        if not f.is_file():
            raise CheckpointError(f"{f}: extra file to copy does not exist")
        if f.name in (CONFIG_NAME, INDEX_NAME) or f.name.endswith(".safetensors"):
            raise CheckpointError(f"{f}: extra file would overwrite the checkpoint's own {f.name}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out}: already exists and is not an empty directory (pass overwrite=True)")
    outs = _outputs(cfg, leaves, target)
    written = target if target is not None else _dtype_of(leaves[("embed", "embedding")])
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = written.name

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(tmp, hf_cfg, _shard(outs, max_shard_bytes), extras)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Moves tmp to out; an existing out is moved aside first and deleted only once tmp is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, aside / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside / out.name, out)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
