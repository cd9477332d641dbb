"""Reading Hugging Face checkpoints: headers checked first, tensors placed one at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from moe_jax.config import ModelConfig
from moe_jax.hf import config_json as hf_config
from moe_jax.hf import keymap
from moe_jax.hf.keymap import (
    CONFIG_NAME,
    INDEX_NAME,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    Params,
    Path_,
    Placer,
)

log = logging.getLogger(__name__)


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
    return hf_config.from_hf(hf, source=str(file)), hf


_FILE_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


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
                                      f"the file does not hold: {keymap.short_list(absent)}")
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

    tensors: list[keymap.Tensor]
    moe_names: dict[int, str]
    fused: dict[int, bool]


def _choose_moe_names(cfg: ModelConfig, keys: set[str]) -> dict[int, str]:
    fam = keymap.FAMILY_NAMES[cfg.model_type]
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
        gate_up = keymap.FUSED_GATE_UP.format(i=i, moe=moe)
        widths = cfg.expert_widths[i]
        if plan.fused[i]:
            if len(set(widths)) != 1:
                raise CheckpointError(f"{gate_up}: fused experts have one width, but the config gives "
                                      f"layer {i} experts of widths {sorted(set(widths))}")
            e, f = len(widths), widths[0]
            expected[gate_up] = (e, 2 * f, d)
            expected[keymap.FUSED_DOWN.format(i=i, moe=moe)] = (e, d, f)
        else:
            for e in range(len(widths)):
                expected.update(dict(keymap.expert_keys(cfg, i, e, moe).values()))
    return expected


def _ignorable(cfg: ModelConfig, key: str) -> bool:
    if keymap.IGNORED_KEY.search(key):
        return True
    if cfg.tie_word_embeddings and key == "lm_head.weight":
        return True
    return False


def _mtp_keys(cfg: ModelConfig, keys: Iterable[str]) -> list[str]:
    """Keys of layers past num_hidden_layers (DeepSeek-V3 multi-token-prediction layers)."""
    out = []
    for key in keys:
        m = keymap.LAYER_INDEX.match(key)
        if m and int(m.group(1)) >= cfg.num_layers:
            out.append(key)
    return out


def _plan(cfg: ModelConfig, ckpt: _Checkpoint, strict: bool) -> _Plan:
    """Checks names, shapes and dtypes against the config from headers alone, then says what to read."""
    keys = ckpt.keys()
    moe_names = _choose_moe_names(cfg, keys)
    fused = {i: keymap.FUSED_GATE_UP.format(i=i, moe=moe_names[i]) in keys for i in cfg.moe_layers}
    plan = _Plan(keymap.tensors(cfg, moe_names), moe_names, fused)
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
        problems.append(f"{len(missing)} weight(s) missing: {keymap.short_list(missing)}")
    if unused and strict:
        problems.append(f"{len(unused)} weight(s) in the checkpoint not used by the config "
                        f"(strict=True): {keymap.short_list(unused)}")
    if problems:
        raise CheckpointError(f"{ckpt.path}: " + "; ".join(problems))
    if unused:
        log.warning("%s: ignoring %d unused weight(s): %s", ckpt.path, len(unused), keymap.short_list(unused))

    bad = []
    for key, shape in expected.items():
        found = ckpt.shape(key)
        if found != tuple(shape):
            bad.append(f"{key} in {ckpt.where(key).name} has shape {found}, expected {tuple(shape)}")
        elif ckpt.dtype(key) not in keymap.FILE_DTYPES:
            bad.append(f"{key} in {ckpt.where(key).name} has dtype {ckpt.dtype(key)}, expected one of "
                       f"{sorted(keymap.FILE_DTYPES)} (quantised checkpoints are not supported)")
    if bad:
        raise CheckpointError(f"{ckpt.path}: {len(bad)} tensor(s) do not match the config: "
                              + "; ".join(bad[:keymap.LIST_LIMIT]) + (" ..." if len(bad) > keymap.LIST_LIMIT else ""))
    return plan


def _set(tree: Params, path: Path_, value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _read_experts(cfg: ModelConfig, ckpt: _Checkpoint, plan: _Plan, layer: int,
                  dtype: np.dtype) -> Iterator[tuple[Path_, np.ndarray]]:
    """Each bucket array of a layer, filled expert by expert in place (zero beyond a width)."""
    moe, d = plan.moe_names[layer], cfg.hidden_size
    for b, bucket in enumerate(cfg.expert_buckets(layer)):
        for part in keymap.PARTS:
            n, fb = len(bucket.expert_ids), bucket.width
            out = np.zeros((n, fb, d) if part == "down" else (n, d, fb), dtype)
            for j, e in enumerate(bucket.expert_ids):
                f = cfg.expert_widths[layer][e]
                if not plan.fused[layer]:
                    w = ckpt.get(keymap.expert_keys(cfg, layer, e, moe)[part][0])  # (F, D) or down (D, F)
                elif part == "down":
                    w = ckpt.get_row(keymap.FUSED_DOWN.format(i=layer, moe=moe), e)  # (D, F)
                else:
                    w = ckpt.get_row(keymap.FUSED_GATE_UP.format(i=layer, moe=moe), e)  # (2F, D)
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
    dtype: Any = "auto",
    *,
    strict: bool = True,
    place: Placer | None = None,
) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) from a Hugging Face checkpoint directory.

    `dtype`: target dtype of the weights (string, numpy/jax dtype). "auto" (transformers 5's
    default) or None: config.json's `dtype` / `torch_dtype`, else the checkpoint's own (that of its
    embedding), so a float32 export reloads as float32 and a bfloat16 Hub checkpoint as bfloat16.
    `strict`: checkpoint tensors the config does not use are an error (else a warning); missing
    tensors are always an error. `place(path, array)` turns each finished numpy array into the
    stored leaf (default `jnp.asarray`; pass a sharded `jax.device_put` for big models, or
    `lambda p, a: a` to keep numpy); it is called once per tensor, so memory stays flat.
    """
    root = Path(path)
    cfg, hf = _read_config(root)
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        dtype = hf.get("dtype") or hf.get("torch_dtype")
    place = place or _default_place
    params: Params = {}
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(root, stack)
        plan = _plan(cfg, ckpt, strict)
        if not dtype:  # the checkpoint's own: that of its embedding
            embed = "model.embed_tokens.weight"
            dtype = _FILE_DTYPE_NAMES.get(ckpt.dtype(embed) if embed in ckpt.keys() else "", "float32")
        target = keymap.as_dtype(dtype)
        for t in plan.tensors:
            arr = keymap.convert(ckpt.get(t.hf_key), t.transpose, np.dtype(np.float32) if t.float32 else target)
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


