"""moe_jax.hf against transformers: tiny random models of the six families.

The oracle is torch's own in-memory state dict, mapped to our tree by a small table written
here independently of moe_jax.hf, and transformers' own loader for what we write.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as T
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as torch_save_file

from moe_jax import hf
from moe_jax.config import ConfigError, ModelConfig
from moe_jax.model import layout

KEEP = lambda p, a: a  # noqa: E731  place=KEEP keeps numpy leaves

_SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_experts_per_tok=2)
_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48,
            moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3)
CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(**_SMALL, intermediate_size=24, num_hidden_layers=2,
                                       num_key_value_heads=2, num_local_experts=4),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_SMALL, intermediate_size=48, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=40, num_hidden_layers=3,
                                          num_key_value_heads=2, num_experts=4, mlp_only_layers=[1]),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_SMALL, intermediate_size=48, moe_intermediate_size=24,
                                          num_hidden_layers=3, num_key_value_heads=2, num_experts=4,
                                          head_dim=16, mlp_only_layers=[0], tie_word_embeddings=True,
                                          attention_bias=True),
    "olmoe": lambda: T.OlmoeConfig(**_SMALL, intermediate_size=24, num_hidden_layers=2,
                                   num_key_value_heads=2, num_experts=4),
    "deepseek_v2": lambda: T.DeepseekV2Config(**_SMALL, **_MLA, n_routed_experts=4, q_lora_rank=None,
                                              topk_method="group_limited_greedy", n_group=2, topk_group=1),
    "deepseek_v2_qlora": lambda: T.DeepseekV2Config(**_SMALL, **_MLA, n_routed_experts=4, q_lora_rank=12,
                                                    attention_bias=True),
    "deepseek_v3": lambda: T.DeepseekV3Config(**_SMALL, **_MLA, n_routed_experts=8, q_lora_rank=12,
                                              n_group=4, topk_group=2),
}
FAMILIES = list(CONFIGS)


# ------------------------------------------------------------------ fixtures and helpers
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random (norms are ones and biases zeros at init: a poor oracle)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))


def _make_model(name: str, out: Path, dtype: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
    """Saves a random tiny model to `out`; returns its in-memory state dict as float32 numpy."""
    model = T.AutoModelForCausalLM.from_config(CONFIGS[name]())
    _randomise(model, seed=FAMILIES.index(name))
    model = model.to(dtype)
    model.save_pretrained(out)
    return {k: v.float().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, _make_model(name, root / name)) for name in FAMILIES}


_ATTN_RENAME = {"q_a_layernorm": "q_a_norm", "kv_a_layernorm": "kv_a_norm", "kv_a_proj_with_mqa": "kv_a_proj"}
_NORMS = {"q_norm", "k_norm", "q_a_norm", "kv_a_norm"}


def _oracle(cfg: ModelConfig, sd: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
    """Our tree (flat) from transformers' in-memory names (fused experts, `mlp.` everywhere)."""
    out: dict[tuple, np.ndarray] = {("embed", "embedding"): sd["model.embed_tokens.weight"],
                                    ("final_norm", "scale"): sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out[("lm_head", "kernel")] = sd["lm_head.weight"].T
    for key, w in sd.items():
        parts = key.split(".")
        if parts[:2] != ["model", "layers"]:
            continue
        layer, rest = f"layer_{parts[2]}", parts[3:]
        if rest[0] in ("input_layernorm", "post_attention_layernorm"):
            out[(layer, "input_norm" if rest[0] == "input_layernorm" else "post_attn_norm", "scale")] = w
        elif rest[0] == "self_attn":
            mod = _ATTN_RENAME.get(rest[1], rest[1])
            leaf = "scale" if mod in _NORMS else ("kernel" if rest[2] == "weight" else "bias")
            out[(layer, "attn", mod, leaf)] = w.T if leaf == "kernel" else w
        elif rest[1] == "gate":
            if rest[2] == "weight":
                out[(layer, "moe", "router", "kernel")] = w.T
            else:
                out[(layer, "moe", "score_bias")] = w
        elif rest[1] == "experts":
            experts = (layer, "moe", "experts", "bucket_0")
            if rest[2] == "gate_up_proj":
                f = w.shape[1] // 2
                out[experts + ("gate",)] = w[:, :f].transpose(0, 2, 1)
                out[experts + ("up",)] = w[:, f:].transpose(0, 2, 1)
            else:
                out[experts + ("down",)] = w.transpose(0, 2, 1)
        elif rest[1] in ("shared_expert", "shared_experts"):
            out[(layer, "moe", "shared", rest[2], "kernel")] = w.T
        elif rest[1] == "shared_expert_gate":
            out[(layer, "moe", "shared_gate", "kernel")] = w.T
        else:
            out[(layer, "mlp", rest[1], "kernel")] = w.T
    return out


def _flat(params: Any, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    if isinstance(params, dict):
        return {k: v for name, sub in params.items() for k, v in _flat(sub, prefix + (name,)).items()}
    return {prefix: np.asarray(params)}


def _assert_same(a: dict[tuple, np.ndarray], b: dict[tuple, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32),
                                      err_msg=str(k))


def _hf_load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    model, info = T.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}, info


def _assert_loads_cleanly(info: dict) -> None:
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), (kind, info[kind])


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


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("name", FAMILIES)
def test_load_matches_torch_state_dict(checkpoints, name):
    path, sd = checkpoints[name]
    cfg, params = hf.load_pretrained(path, "float32", place=KEEP)
    _assert_same(_flat(params), _oracle(cfg, sd))
    assert params["layer_1"]["input_norm"]["scale"].dtype == np.float32


def test_default_place_gives_jax_arrays_in_bf16(checkpoints):
    import jax

    _, params = hf.load_pretrained(checkpoints["deepseek_v3"][0], "bfloat16")
    assert isinstance(params["embed"]["embedding"], jax.Array)
    assert params["embed"]["embedding"].dtype == ml_dtypes.bfloat16
    assert params["layer_1"]["moe"]["experts"]["bucket_0"]["gate"].dtype == ml_dtypes.bfloat16
    # Router maths is float32: the router and DeepSeek-V3's score bias stay float32.
    assert params["layer_1"]["moe"]["router"]["kernel"].dtype == np.float32
    assert params["layer_1"]["moe"]["score_bias"].dtype == np.float32


def test_default_dtype_follows_the_checkpoint(checkpoints, tmp_path):
    """dtype "auto" (the default, as transformers 5's): config.json's dtype, else the file's own."""
    path = checkpoints["mixtral"][0]
    written = json.loads((path / "config.json").read_text())
    assert (written.get("dtype") or written.get("torch_dtype")) == "float32"
    _, params = hf.load_pretrained(path, place=KEEP)
    assert params["embed"]["embedding"].dtype == np.float32
    cfg, params16 = hf.load_pretrained(path, "bfloat16", place=KEEP)
    out = hf.save_pretrained(cfg, params16, tmp_path / "bf16")
    assert hf.load_pretrained(out, place=KEEP)[1]["embed"]["embedding"].dtype == ml_dtypes.bfloat16
    config = json.loads((out / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):  # no dtype in config.json: the weights' own
        config.pop(key, None)
    (out / "config.json").write_text(json.dumps(config))
    assert hf.load_pretrained(out, place=KEEP)[1]["embed"]["embedding"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_expert_checkpoint_loads_the_same(checkpoints, tmp_path, name):
    """transformers 5's in-memory layout (gate_up_proj / down_proj; Mixtral under `mlp.`)."""
    path, sd = checkpoints[name]
    shutil.copy(path / "config.json", tmp_path / "config.json")
    model = T.AutoModelForCausalLM.from_pretrained(path)
    tensors = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    assert any(k.endswith("experts.gate_up_proj") for k in tensors)
    torch_save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, fused = hf.load_pretrained(tmp_path, "float32", place=KEEP)
    _, per_expert = hf.load_pretrained(path, "float32", place=KEEP)
    _assert_same(_flat(fused), _flat(per_expert))


def test_load_tokenizer(checkpoints, tmp_path):
    from tokenizers import Tokenizer, models

    assert hf.load_tokenizer(checkpoints["olmoe"][0]) is None
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert hf.load_tokenizer(tmp_path).token_to_id("a") == 0
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(hf.CheckpointError, match="tokenizer.json"):
        hf.load_tokenizer(tmp_path)


# ------------------------------------------------------------------ saving
@pytest.mark.parametrize("name", FAMILIES)
def test_save_loads_in_transformers(checkpoints, tmp_path, name):
    path, sd = checkpoints[name]
    cfg, params = hf.load_pretrained(path, "float32")
    hf.save_pretrained(cfg, params, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "float32"
    reloaded, info = _hf_load(tmp_path / "out")
    _assert_loads_cleanly(info)
    _assert_same({(k,): v for k, v in reloaded.items()}, {(k,): v for k, v in sd.items()})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_sharded_save_round_trips(checkpoints, tmp_path, name):
    path, sd = checkpoints[name]
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
    _assert_same(_flat(params2), _flat(params))
    reloaded, info = _hf_load(out)
    _assert_loads_cleanly(info)
    _assert_same({(k,): v for k, v in reloaded.items()}, {(k,): v for k, v in sd.items()})


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
def test_non_uniform_round_trip(checkpoints, tmp_path, name):
    cfg, params = hf.load_pretrained(checkpoints[name][0], "float32", place=KEEP)
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
    _assert_same(_flat(params2), _flat(params))
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
    sd = _make_model("deepseek_v3", tmp_path / "bf16", torch.bfloat16)
    assert set(_file_dtypes(tmp_path / "bf16").values()) == {"BF16"}
    cfg, params = hf.load_pretrained(tmp_path / "bf16", "bfloat16", place=KEEP)
    assert params["layer_1"]["attn"]["q_a_proj"]["kernel"].dtype == ml_dtypes.bfloat16
    _assert_same(_flat(params), _oracle(cfg, sd))
    out = hf.save_pretrained(cfg, params, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded, info = _hf_load(out)
    _assert_loads_cleanly(info)
    _assert_same({(k,): v for k, v in reloaded.items()}, {(k,): v for k, v in sd.items()})
    _, params2 = hf.load_pretrained(out, "bf16", place=KEEP)
    _assert_same(_flat(params2), _flat(params))


def test_save_casts_to_dtype(checkpoints, tmp_path):
    cfg, params = hf.load_pretrained(checkpoints["deepseek_v3"][0], "float32", place=KEEP)
    out = hf.save_pretrained(cfg, params, tmp_path / "out", dtype="bfloat16")
    dtypes = _file_dtypes(out)
    kept_f32 = {f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2)}
    assert {k for k, d in dtypes.items() if d != "BF16"} == kept_f32
    _, params2 = hf.load_pretrained(out, "float32", place=KEEP)
    want = params["embed"]["embedding"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(params2["embed"]["embedding"], want)


def test_overwrite_and_extra_files(checkpoints, tmp_path):
    cfg, params = hf.load_pretrained(checkpoints["olmoe"][0], "float32", place=KEEP)
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


# ------------------------------------------------------------------ memory
def test_peak_memory_is_about_one_copy(tmp_path):
    """Loading holds one copy in the target dtype plus about one tensor, not the checkpoint in f32."""
    cfg = ModelConfig.create(model_type="qwen3_moe", vocab_size=256, hidden_size=128, num_layers=3,
                             num_heads=4, num_kv_heads=2, head_dim=32, qk_norm="head", num_experts=16,
                             moe_intermediate_size=256, num_experts_per_tok=2)
    rng = np.random.default_rng(0)
    params: dict = {}
    for p, shape in hf.expected_param_shapes(cfg).items():
        hf._set(params, p, rng.standard_normal(shape, dtype=np.float32))
    hf.save_pretrained(cfg, params, tmp_path / "ckpt", dtype="bfloat16")
    for dtype in ("bfloat16", "float32"):
        tracemalloc.start()
        _, loaded = hf.load_pretrained(tmp_path / "ckpt", dtype, place=KEEP)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        sizes = [a.nbytes for a in _flat(loaded).values()]
        # Measured: about sum(sizes) + 0.15 MB; holding the checkpoint then converting is 1.5-2x.
        assert peak < sum(sizes) + 2 * max(sizes), (dtype, peak, sum(sizes), max(sizes))
        del loaded


# ------------------------------------------------------------------ bad input
def test_missing_config(tmp_path):
    with pytest.raises(hf.CheckpointError, match=r"config\.json"):
        hf.load_pretrained(tmp_path)


def test_no_weights_file(checkpoints, tmp_path):
    shutil.copy(checkpoints["olmoe"][0] / "config.json", tmp_path)
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors"):
        hf.load_pretrained(tmp_path)


@pytest.mark.parametrize("change, culprit", [({"model_type": "llama"}, "llama"),
                                             ({"hidden_act": "gelu"}, "hidden_act"),
                                             ({"quantization_config": {"quant_method": "fp8"}}, "fp8")])
def test_unsupported_config(checkpoints, tmp_path, change, culprit):
    path = _copy(checkpoints["qwen2_moe"][0], tmp_path / "c")
    _edit_config(path, **change)
    with pytest.raises(ConfigError, match=culprit):
        hf.load_pretrained(path)


def _sharded(checkpoints, tmp_path) -> Path:
    cfg, params = hf.load_pretrained(checkpoints["mixtral"][0], "float32", place=KEEP)
    return hf.save_pretrained(cfg, params, tmp_path / "sharded", max_shard_bytes=16 * 1024)


def test_missing_shard(checkpoints, tmp_path):
    path = _sharded(checkpoints, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(hf.CheckpointError, match=shard.name):
        hf.load_pretrained(path)


def test_index_names_tensor_the_shard_lacks(checkpoints, tmp_path):
    path = _sharded(checkpoints, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    first, other = wm["model.embed_tokens.weight"], wm["lm_head.weight"]
    assert first != other
    wm["model.embed_tokens.weight"] = other
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hf.CheckpointError, match=rf"{other}.*model\.embed_tokens\.weight"):
        hf.load_pretrained(path)


@pytest.mark.parametrize("keep", [0, 100, -16])
def test_truncated_or_corrupt_file(checkpoints, tmp_path, keep):
    path = _copy(checkpoints["olmoe"][0], tmp_path / "c")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        hf.load_pretrained(path)


def test_wrong_shape(checkpoints, tmp_path):
    path = _copy(checkpoints["qwen3_moe"][0], tmp_path / "c")
    key = "model.layers.2.mlp.experts.1.down_proj.weight"
    _edit_weights(path, add={key: np.zeros((32, 20), np.float32)})
    with pytest.raises(hf.CheckpointError, match=rf"{key}.*\(32, 20\), expected \(32, 24\)"):
        hf.load_pretrained(path)


def test_unsupported_tensor_dtype(checkpoints, tmp_path):
    path = _copy(checkpoints["olmoe"][0], tmp_path / "c")
    _edit_weights(path, add={"model.norm.weight": np.zeros(32, np.int8)})
    with pytest.raises(hf.CheckpointError, match=r"model\.norm\.weight.*I8"):
        hf.load_pretrained(path)
    with pytest.raises(hf.CheckpointError, match="int8"):
        hf.load_pretrained(checkpoints["olmoe"][0], "int8")


def test_missing_weights_are_listed(checkpoints, tmp_path):
    path = _copy(checkpoints["deepseek_v3"][0], tmp_path / "c")
    dropped = [k for k in load_file(path / "model.safetensors") if k.startswith("model.layers.2.")]
    assert len(dropped) > 20
    _edit_weights(path, drop=dropped)
    with pytest.raises(hf.CheckpointError) as err:
        hf.load_pretrained(path, strict=False)  # missing is an error even when not strict
    msg = str(err.value)
    assert f"{len(dropped)} weight(s) missing" in msg and f"({len(dropped) - 20} more)" in msg
    assert sorted(dropped)[0] in msg


def test_unused_weights(checkpoints, tmp_path, caplog):
    path = _copy(checkpoints["mixtral"][0], tmp_path / "c")
    extra = "model.layers.0.block_sparse_moe.experts.9.w1.weight"
    _edit_weights(path, add={extra: np.zeros((24, 32), np.float32),
                             "model.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(hf.CheckpointError, match=r"2 weight\(s\).*not used.*model\.extra.*experts\.9\.w1"):
        hf.load_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="moe_jax.hf"):
        _, params = hf.load_pretrained(path, "float32", strict=False, place=KEEP)
    assert "model.extra.weight" in caplog.text
    assert params["layer_0"]["moe"]["experts"]["bucket_0"]["gate"].shape == (4, 32, 24)


def test_mtp_layers_are_skipped(checkpoints, tmp_path, caplog):
    path = _copy(checkpoints["deepseek_v3"][0], tmp_path / "c")
    _edit_weights(path, add={"model.layers.3.eh_proj.weight": np.zeros((32, 64), np.float32),
                             "model.layers.3.mlp.experts.0.up_proj.weight": np.zeros((24, 32), np.float32)})
    with caplog.at_level(logging.INFO, logger="moe_jax.hf"):
        cfg, _ = hf.load_pretrained(path, "float32", place=KEEP)
    assert "skipping 2 tensors" in caplog.text and cfg.num_layers == 3


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("damage, culprit", [
    ("shape", r"layer_0/attn/q_proj/kernel has shape \(32, 16\), expected \(32, 32\)"),
    ("missing", r"1 param\(s\) missing: final_norm/scale"),
    ("extra", r"does not describe: layer_0/attn/extra"),
    ("padding", r"experts\.1\.gate_proj\.weight.*non-zero values beyond"),
])
def test_bad_params_write_nothing(checkpoints, tmp_path, damage, culprit):
    cfg, params = hf.load_pretrained(checkpoints["qwen2_moe"][0], "float32", place=KEEP)
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


def test_unexpressible_config_writes_nothing(checkpoints, tmp_path):
    cfg, params = hf.load_pretrained(checkpoints["mixtral"][0], "float32", place=KEEP)
    cfg = cfg.replace(layer_kinds=("dense", "moe"), experts_per_layer=(0, 4), dense_intermediate_size=24,
                      expert_widths=((), cfg.expert_widths[1]))
    with pytest.raises(ConfigError, match="dense"):
        hf.save_pretrained(cfg, params, tmp_path / "out")
    assert _entries(tmp_path) == []


def test_crash_mid_write_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    cfg, params = hf.load_pretrained(checkpoints["olmoe"][0], "float32", place=KEEP)
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
