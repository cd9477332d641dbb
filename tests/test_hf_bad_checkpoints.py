"""moe_jax.hf on bad keymap_checkpoints: a missing or truncated file or shard, an unsupported config or
tensor dtype, a wrong shape, missing or unused weights each fail before anything is returned,
with an error naming the file and key (conftest.KEYMAP_HF_CONFIGS' keymap_checkpoints, edited on copies)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moe_jax import hf
from moe_jax.config import ConfigError
from tests.conftest import KEEP


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_weights(path: Path, drop=(), add=None) -> None:
    tensors = load_file(path / "model.safetensors")
    for k in drop:
        del tensors[k]
    tensors.update(add or {})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_config(tmp_path):
    with pytest.raises(hf.CheckpointError, match=r"config\.json"):
        hf.load_pretrained(tmp_path)


def test_no_weights_file(keymap_checkpoints, tmp_path):
    shutil.copy(keymap_checkpoints["olmoe"][0] / "config.json", tmp_path)
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors"):
        hf.load_pretrained(tmp_path)


@pytest.mark.parametrize("change, culprit", [({"model_type": "llama"}, "llama"),
                                             ({"hidden_act": "gelu"}, "hidden_act"),
                                             ({"quantization_config": {"quant_method": "fp8"}}, "fp8")])
def test_unsupported_config(keymap_checkpoints, tmp_path, change, culprit):
    path = _copy(keymap_checkpoints["qwen2_moe"][0], tmp_path / "c")
    _edit_config(path, **change)
    with pytest.raises(ConfigError, match=culprit):
        hf.load_pretrained(path)


def _sharded(keymap_checkpoints, tmp_path) -> Path:
    cfg, params = hf.load_pretrained(keymap_checkpoints["mixtral"][0], "float32", place=KEEP)
    return hf.save_pretrained(cfg, params, tmp_path / "sharded", max_shard_bytes=16 * 1024)


def test_missing_shard(keymap_checkpoints, tmp_path):
    path = _sharded(keymap_checkpoints, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(hf.CheckpointError, match=shard.name):
        hf.load_pretrained(path)


def test_index_names_tensor_the_shard_lacks(keymap_checkpoints, tmp_path):
    path = _sharded(keymap_checkpoints, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    first, other = wm["model.embed_tokens.weight"], wm["lm_head.weight"]
    assert first != other
    wm["model.embed_tokens.weight"] = other
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hf.CheckpointError, match=rf"{other}.*model\.embed_tokens\.weight"):
        hf.load_pretrained(path)


@pytest.mark.parametrize("keep", [0, 100, -16])
def test_truncated_or_corrupt_file(keymap_checkpoints, tmp_path, keep):
    path = _copy(keymap_checkpoints["olmoe"][0], tmp_path / "c")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        hf.load_pretrained(path)


def test_wrong_shape(keymap_checkpoints, tmp_path):
    path = _copy(keymap_checkpoints["qwen3_moe"][0], tmp_path / "c")
    key = "model.layers.2.mlp.experts.1.down_proj.weight"
    _edit_weights(path, add={key: np.zeros((32, 20), np.float32)})
    with pytest.raises(hf.CheckpointError, match=rf"{key}.*\(32, 20\), expected \(32, 24\)"):
        hf.load_pretrained(path)


def test_unsupported_tensor_dtype(keymap_checkpoints, tmp_path):
    path = _copy(keymap_checkpoints["olmoe"][0], tmp_path / "c")
    _edit_weights(path, add={"model.norm.weight": np.zeros(32, np.int8)})
    with pytest.raises(hf.CheckpointError, match=r"model\.norm\.weight.*I8"):
        hf.load_pretrained(path)
    with pytest.raises(hf.CheckpointError, match="int8"):
        hf.load_pretrained(keymap_checkpoints["olmoe"][0], "int8")


def test_missing_weights_are_listed(keymap_checkpoints, tmp_path):
    path = _copy(keymap_checkpoints["deepseek_v3"][0], tmp_path / "c")
    dropped = [k for k in load_file(path / "model.safetensors") if k.startswith("model.layers.2.")]
    assert len(dropped) > 20
    _edit_weights(path, drop=dropped)
    with pytest.raises(hf.CheckpointError) as err:
        hf.load_pretrained(path, strict=False)  # missing is an error even when not strict
    msg = str(err.value)
    assert f"{len(dropped)} weight(s) missing" in msg and f"({len(dropped) - 20} more)" in msg
    assert sorted(dropped)[0] in msg


def test_unused_weights(keymap_checkpoints, tmp_path, caplog):
    path = _copy(keymap_checkpoints["mixtral"][0], tmp_path / "c")
    extra = "model.layers.0.block_sparse_moe.experts.9.w1.weight"
    _edit_weights(path, add={extra: np.zeros((24, 32), np.float32),
                             "model.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(hf.CheckpointError, match=r"2 weight\(s\).*not used.*model\.extra.*experts\.9\.w1"):
        hf.load_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="moe_jax.hf"):
        _, params = hf.load_pretrained(path, "float32", strict=False, place=KEEP)
    assert "model.extra.weight" in caplog.text
    assert params["layer_0"]["moe"]["experts"]["bucket_0"]["gate"].shape == (4, 32, 24)


def test_mtp_layers_are_skipped(keymap_checkpoints, tmp_path, caplog):
    path = _copy(keymap_checkpoints["deepseek_v3"][0], tmp_path / "c")
    _edit_weights(path, add={"model.layers.3.eh_proj.weight": np.zeros((32, 64), np.float32),
                             "model.layers.3.mlp.experts.0.up_proj.weight": np.zeros((24, 32), np.float32)})
    with caplog.at_level(logging.INFO, logger="moe_jax.hf"):
        cfg, _ = hf.load_pretrained(path, "float32", place=KEEP)
    assert "skipping 2 tensors" in caplog.text and cfg.num_layers == 3
