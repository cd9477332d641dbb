"""Writing Hugging Face checkpoints: checked first, written to a temporary directory, renamed."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from moe_jax import multihost
from moe_jax.config import ModelConfig
from moe_jax.hf import config_json as hf_config
from moe_jax.hf import keymap
from moe_jax.hf.keymap import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    Params,
    Path_,
    expected_param_shapes,
)

log = logging.getLogger(__name__)

# Remote code for non-uniform exports (package data, never imported by moe_jax: torch + transformers only).
REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote_code"
REMOTE_CODE_FILES = tuple(REMOTE_CODE_DIR / f"{name}.py"
                          for name in (hf_config.REMOTE_CONFIG_FILE, hf_config.REMOTE_MODELING_FILE))


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
        problems.append(f"{len(missing)} param(s) missing: {keymap.short_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} param(s) the config does not describe: {keymap.short_list(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} param(s) with the wrong shape: " + "; ".join(wrong[:keymap.LIST_LIMIT]))
    if problems:
        raise CheckpointError("params do not match the config: " + "; ".join(problems))
    return leaves


def _dtype_of(leaf: Any) -> np.dtype:
    return np.dtype(leaf.dtype)


def _to_hf(leaf: Any, transpose: bool, dtype: np.dtype) -> np.ndarray:
    return keymap.convert(np.asarray(leaf), transpose, dtype)


def _expert_part(leaf: Any, row: int, width: int, part: str, dtype: np.dtype, key: str) -> np.ndarray:
    """One expert's HF weight (out, in) from its bucket row; the padding must be zero."""
    w = np.asarray(leaf[row])  # gate/up (D, F_b), down (F_b, D)
    keep, pad = (w[:width], w[width:]) if part == "down" else (w[:, :width], w[:, width:])
    if pad.size and np.any(pad != 0):
        raise CheckpointError(f"{key}: the bucket holds non-zero values beyond the expert's width "
                              f"{width}; the config's expert_widths do not match the params")
    return keymap.convert(keep, True, dtype)


def _outputs(cfg: ModelConfig, leaves: dict[Path_, Any], dtype: np.dtype | None) -> list[_Out]:
    """Every tensor to write, layer by layer (a layer's experts follow its other tensors)."""

    def out_dtype(leaf: Any, path: Path_) -> np.dtype:
        if dtype is None:
            return _dtype_of(leaf)
        if path[-1] == "score_bias" and _dtype_of(leaf) == np.float32:
            return np.dtype(np.float32)  # transformers keeps e_score_correction_bias float32 too
        return dtype

    groups: dict[str, list[_Out]] = {}
    for t in keymap.tensors(cfg):
        leaf, d = leaves[t.path], out_dtype(leaves[t.path], t.path)
        make = functools.partial(_to_hf, leaf, t.transpose, d)
        groups.setdefault(t.path[0], []).append(_Out(t.hf_key, t.hf_shape, d, make))
    for i in cfg.moe_layers:
        for b, bucket in enumerate(cfg.expert_buckets(i)):
            base = (cfg.layer_name(i), "moe", "experts", f"bucket_{b}")
            for j, e in enumerate(bucket.expert_ids):
                width = cfg.expert_widths[i][e]
                for part, (key, shape) in keymap.expert_keys(cfg, i, e).items():
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
    transformers. Non-uniform ones (of `hf_config.REMOTE_CODE_FAMILIES`) get a moe_jax model_type,
    an auto_map and the remote code beside the weights, so transformers loads them with
    trust_remote_code=True; all round-trip through `load_pretrained`. `dtype` None keeps
    each tensor's dtype. `extra_files` (tokenizer files, ...) are copied in. Everything is
    checked first and written to a temporary directory renamed at the end: on failure nothing
    is left. An existing non-empty `out_dir` is an error unless `overwrite`. Under
    `jax.distributed` every process calls it (cross-host shards are gathered) and process 0 writes.
    """
    out = Path(out_dir)
    hf_cfg = hf_config.to_hf(cfg)  # ConfigError for configs no config.json can express
    leaves = {path: multihost.gathered(leaf) for path, leaf in _check_params(cfg, params).items()}
    target = keymap.as_dtype(dtype) if dtype is not None else None
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    extras = [Path(f) for f in extra_files]
    remote = list(REMOTE_CODE_FILES) if hf_config.uses_remote_code(hf_cfg) else []
    for f in extras:
        if not f.is_file():
            raise CheckpointError(f"{f}: extra file to copy does not exist")
        if (f.name in (CONFIG_NAME, INDEX_NAME) or f.name.endswith(".safetensors")
                or f.name in {r.name for r in remote}):
            raise CheckpointError(f"{f}: extra file would overwrite the checkpoint's own {f.name}")
    for f in remote:
        if not f.is_file():
            raise CheckpointError(f"{f}: moe_jax's remote code for non-uniform exports is missing "
                                  "(package data not installed?)")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out}: already exists and is not an empty directory (pass overwrite=True)")
    outs = _outputs(cfg, leaves, target)
    if jax.process_index() != 0:  # multi-host: every process gathered above, process 0 writes
        return out
    written = target if target is not None else _dtype_of(leaves[("embed", "embedding")])
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = written.name

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(tmp, hf_cfg, _shard(outs, max_shard_bytes), remote + extras)
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
