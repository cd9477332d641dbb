"""moe_jax.hf saving against transformers: what `save_pretrained` writes loads in transformers
and round-trips through `load_pretrained` (sharded, non-uniform, bfloat16), and params that do
not match their config, or a crash mid-write, leave nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as T
from safetensors import safe_open
from safetensors.numpy import save_file

from moe_jax import hf
from moe_jax.config import ConfigError, ModelConfig
from moe_jax.model import layout
from tests.conftest import KEEP, KEYMAP_FAMILIES, assert_same_leaves, flat_leaves, keymap_oracle, make_keymap_checkpoint


def _hf_load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    model, info = T.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}, info


def _assert_loads_cleanly(info: dict) -> None:
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), (kind, info[kind])


@pytest.mark.parametrize("name", KEYMAP_FAMILIES)
def test_save_loads_in_transformers(keymap_checkpoints, tmp_path, name):
    path, sd = keymap_checkpoints[name]
    cfg, params = hf.load_pretrained(path, "float32")
    hf.save_pretrained(cfg, params, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "float32"
    reloaded, info = _hf_load(tmp_path / "out")
    _assert_loads_cleanly(info)
    assert_same_leaves({(k,): v for k, v in reloaded.items()}, {(k,): v for k, v in sd.items()})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_sharded_save_round_trips(keymap_checkpoints, tmp_path, name):
    path, sd = keymap_checkpoints[name]
    cfg, params = hf.load_pretrained(path, "float32", place=KEEP)
    out = hf.save_pretrained(cfg, params, tmp_path / "out", max_shard_bytes=16 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for shard in shards:
        assert os.path.getsize(out / shard) < 16 * 1024 + 4096  # data + header
    cfg2, params2 = hf.load_pretrained(out, "float32", place=KEEP)
    assert cfg2 == cfg.replace(hf_extra=cfg2.hf_extra)
    assert_same_leaves(flat_leaves(params2), flat_leaves(params))
    reloaded, info = _hf_load(out)
    _assert_loads_cleanly(info)
    assert_same_leaves({(k,): v for k, v in reloaded.items()}, {(k,): v for k, v in sd.items()})


def _non_uniform(cfg: ModelConfig, params: dict, widths: dict[int, tuple[int, ...]], seed: int):
    """cfg and params with the given per-layer expert widths, experts packed by layout.pack_experts."""
    rng = np.random.default_rng(seed)
    d = cfg.hidden_size
    params = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    for layer, ws in widths.items():
        cfg = cfg.with_layer_experts(layer, ws)
        experts = [{"gate": rng.standard_normal((d, f)).astype(np.float32),
                    "up": rng.standard_normal((d, f)).astype(np.float32),
                    "down": rng.standard_normal((f, d)).astype(np.float32)} for f in ws]
        moe = dict(params[f"layer_{layer}"]["moe"])
        moe["experts"] = layout.pack_experts(cfg, layer, experts)
        moe["router"] = {"kernel": rng.standard_normal((d, len(ws))).astype(np.float32)}
        if cfg.router_bias:
            moe["score_bias"] = rng.standard_normal(len(ws)).astype(np.float32)
        params[f"layer_{layer}"] = {**params[f"layer_{layer}"], "moe": moe}
    return cfg, params


NON_UNIFORM = {
    "qwen2_moe": {0: (24, 8, 16, 24, 4), 2: (12, 20, 6)},
    "deepseek_v3": {1: (24, 12, 6, 24), 2: (24, 3, 24, 24, 10, 17, 24, 5)},
}


@pytest.mark.parametrize("name", list(NON_UNIFORM))
def test_non_uniform_round_trip(keymap_checkpoints, tmp_path, name):
    cfg, params = hf.load_pretrained(keymap_checkpoints[name][0], "float32", place=KEEP)
    cfg, params = _non_uniform(cfg, params, NON_UNIFORM[name], seed=3)
    assert not cfg.is_uniform and any(len(cfg.expert_buckets(i)) > 1 for i in NON_UNIFORM[name])
    out = hf.save_pretrained(cfg, params, tmp_path / "out", max_shard_bytes=8 * 1024)
    written = json.loads((out / "config.json").read_text())["moe_jax"]
    assert written["expert_widths"] == [list(w) for w in cfg.expert_widths]
    layer, ws = next(iter(NON_UNIFORM[name].items()))
    shapes = _file_shapes(out)
    for e, f in enumerate(ws):  # each expert at its own width, no padding on disk
        assert shapes[f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight"] == (f, cfg.hidden_size)
        assert shapes[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"] == (cfg.hidden_size, f)
    cfg2, params2 = hf.load_pretrained(out, "float32", place=KEEP)
    assert (cfg2.expert_widths, cfg2.layer_kinds) == (cfg.expert_widths, cfg.layer_kinds)
    assert cfg2 == cfg.replace(hf_extra=cfg2.hf_extra)
    assert_same_leaves(flat_leaves(params2), flat_leaves(params))
    for e, f in enumerate(ws):
        w = layout.expert_weight(cfg2, params2, layer, e)
        assert w["gate"].shape == (cfg.hidden_size, f)


def _file_shapes(path: Path) -> dict[str, tuple]:
    shapes = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "numpy") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def _file_dtypes(path: Path) -> dict[str, str]:
    with safe_open(str(path / "model.safetensors"), "numpy") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_bf16_round_trip(tmp_path):
    sd = make_keymap_checkpoint("deepseek_v3", tmp_path / "bf16", torch.bfloat16)
    assert set(_file_dtypes(tmp_path / "bf16").values()) == {"BF16"}
    cfg, params = hf.load_pretrained(tmp_path / "bf16", "bfloat16", place=KEEP)
    assert params["layer_1"]["attn"]["q_a_proj"]["kernel"].dtype == ml_dtypes.bfloat16
    assert_same_leaves(flat_leaves(params), keymap_oracle(cfg, sd))
    out = hf.save_pretrained(cfg, params, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded, info = _hf_load(out)
    _assert_loads_cleanly(info)
    assert_same_leaves({(k,): v for k, v in reloaded.items()}, {(k,): v for k, v in sd.items()})
    _, params2 = hf.load_pretrained(out, "bf16", place=KEEP)
    assert_same_leaves(flat_leaves(params2), flat_leaves(params))


def test_save_casts_to_dtype(keymap_checkpoints, tmp_path):
    cfg, params = hf.load_pretrained(keymap_checkpoints["deepseek_v3"][0], "float32", place=KEEP)
    out = hf.save_pretrained(cfg, params, tmp_path / "out", dtype="bfloat16")
    dtypes = _file_dtypes(out)
    kept_f32 = {f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2)}
    assert {k for k, d in dtypes.items() if d != "BF16"} == kept_f32
    _, params2 = hf.load_pretrained(out, "float32", place=KEEP)
    want = params["embed"]["embedding"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(params2["embed"]["embedding"], want)


def test_overwrite_and_extra_files(keymap_checkpoints, tmp_path):
    cfg, params = hf.load_pretrained(keymap_checkpoints["olmoe"][0], "float32", place=KEEP)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(hf.CheckpointError, match="already exists"):
        hf.save_pretrained(cfg, params, out)
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]
    (tmp_path / "tokenizer.json").write_text("{}")
    hf.save_pretrained(cfg, params, out, overwrite=True, extra_files=[tmp_path / "tokenizer.json"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tokenizer.json"]


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("damage, culprit", [
    ("shape", r"layer_0/attn/q_proj/kernel has shape \(32, 16\), expected \(32, 32\)"),
    ("missing", r"1 param\(s\) missing: final_norm/scale"),
    ("extra", r"does not describe: layer_0/attn/extra"),
    ("padding", r"experts\.1\.gate_proj\.weight.*non-zero values beyond"),
])
def test_bad_params_write_nothing(keymap_checkpoints, tmp_path, damage, culprit):
    cfg, params = hf.load_pretrained(keymap_checkpoints["qwen2_moe"][0], "float32", place=KEEP)
    if damage == "shape":
        params["layer_0"]["attn"]["q_proj"]["kernel"] = np.zeros((32, 16), np.float32)
    elif damage == "missing":
        del params["final_norm"]
    elif damage == "extra":
        params["layer_0"]["attn"]["extra"] = np.zeros(3, np.float32)
    else:  # one bucket: expert 1 (width 16) is padded to 24, and the padding is not zero
        cfg, params = _non_uniform(cfg.replace(max_width_buckets=1), params, {0: (24, 16, 24, 24)}, seed=1)
        params["layer_0"]["moe"]["experts"]["bucket_0"]["gate"][1, 0, 20] = 1.0
    before = _entries(tmp_path)
    with pytest.raises(hf.CheckpointError, match=culprit):
        hf.save_pretrained(cfg, params, tmp_path / "out", max_shard_bytes=4096)
    assert _entries(tmp_path) == before


def test_unexpressible_config_writes_nothing(keymap_checkpoints, tmp_path):
    cfg, params = hf.load_pretrained(keymap_checkpoints["mixtral"][0], "float32", place=KEEP)
    cfg = cfg.replace(layer_kinds=("dense", "moe"), experts_per_layer=(0, 4), dense_intermediate_size=24,
                      expert_widths=((), cfg.expert_widths[1]))
    with pytest.raises(ConfigError, match="dense"):
        hf.save_pretrained(cfg, params, tmp_path / "out")
    assert _entries(tmp_path) == []


def test_crash_mid_write_leaves_nothing(keymap_checkpoints, tmp_path, monkeypatch):
    cfg, params = hf.load_pretrained(keymap_checkpoints["olmoe"][0], "float32", place=KEEP)
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    import moe_jax.hf.save

    monkeypatch.setattr(moe_jax.hf.save, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        hf.save_pretrained(cfg, params, tmp_path / "out", max_shard_bytes=8 * 1024)
    assert _entries(tmp_path) == []
    (tmp_path / "out").mkdir()  # with overwrite=True, a failed save keeps the old checkpoint intact
    (tmp_path / "out" / "old.txt").write_text("old")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        hf.save_pretrained(cfg, params, tmp_path / "out", max_shard_bytes=8 * 1024, overwrite=True)
    assert _entries(tmp_path) == ["out"] and _entries(tmp_path / "out") == ["old.txt"]
