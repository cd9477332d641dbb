"""moe_jax.hf loading against transformers: tiny random models of the six families
(conftest.KEYMAP_HF_CONFIGS). The oracle is torch's own in-memory state dict, mapped to our tree
by a table written independently of moe_jax.hf (conftest.keymap_oracle)."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import transformers as T
from flax import traverse_util
from safetensors.torch import save_file as torch_save_file

from moe_jax import hf
from moe_jax.config import ModelConfig
from tests.conftest import KEEP, KEYMAP_FAMILIES, assert_same_leaves, flat_leaves, keymap_oracle


@pytest.mark.parametrize("name", KEYMAP_FAMILIES)
def test_load_matches_torch_state_dict(keymap_checkpoints, name):
    path, sd = keymap_checkpoints[name]
    cfg, params = hf.load_pretrained(path, "float32", place=KEEP)
    assert_same_leaves(flat_leaves(params), keymap_oracle(cfg, sd))
    assert params["layer_1"]["input_norm"]["scale"].dtype == np.float32


def test_default_place_gives_jax_arrays_in_bf16(keymap_checkpoints):
    import jax

    _, params = hf.load_pretrained(keymap_checkpoints["deepseek_v3"][0], "bfloat16")
    assert isinstance(params["embed"]["embedding"], jax.Array)
    assert params["embed"]["embedding"].dtype == ml_dtypes.bfloat16
    assert params["layer_1"]["moe"]["experts"]["bucket_0"]["gate"].dtype == ml_dtypes.bfloat16
    # Router maths is float32: the router and DeepSeek-V3's score bias stay float32.
    assert params["layer_1"]["moe"]["router"]["kernel"].dtype == np.float32
    assert params["layer_1"]["moe"]["score_bias"].dtype == np.float32


def test_default_dtype_follows_the_checkpoint(keymap_checkpoints, tmp_path):
    """dtype "auto" (the default, as transformers 5's): config.json's dtype, else the file's own."""
    path = keymap_checkpoints["mixtral"][0]
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


@pytest.mark.parametrize("name", KEYMAP_FAMILIES)
def test_fused_expert_checkpoint_loads_the_same(keymap_checkpoints, tmp_path, name):
    """transformers 5's in-memory layout (gate_up_proj / down_proj; Mixtral under `mlp.`)."""
    path, sd = keymap_checkpoints[name]
    shutil.copy(path / "config.json", tmp_path / "config.json")
    model = T.AutoModelForCausalLM.from_pretrained(path)
    tensors = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    assert any(k.endswith("experts.gate_up_proj") for k in tensors)
    torch_save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, fused = hf.load_pretrained(tmp_path, "float32", place=KEEP)
    _, per_expert = hf.load_pretrained(path, "float32", place=KEEP)
    assert_same_leaves(flat_leaves(fused), flat_leaves(per_expert))


def test_load_tokenizer(keymap_checkpoints, tmp_path):
    from tokenizers import Tokenizer, models

    assert hf.load_tokenizer(keymap_checkpoints["olmoe"][0]) is None
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert hf.load_tokenizer(tmp_path).token_to_id("a") == 0
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(hf.CheckpointError, match="tokenizer.json"):
        hf.load_tokenizer(tmp_path)


def test_peak_memory_is_about_one_copy(tmp_path):
    """Loading holds one copy in the target dtype plus about one tensor, not the checkpoint in f32."""
    cfg = ModelConfig.create(model_type="qwen3_moe", vocab_size=256, hidden_size=128, num_layers=3,
                             num_heads=4, num_kv_heads=2, head_dim=32, qk_norm="head", num_experts=16,
                             moe_intermediate_size=256, num_experts_per_tok=2)
    rng = np.random.default_rng(0)
    params = traverse_util.unflatten_dict({p: rng.standard_normal(shape, dtype=np.float32)
                                           for p, shape in hf.expected_param_shapes(cfg).items()})
    hf.save_pretrained(cfg, params, tmp_path / "ckpt", dtype="bfloat16")
    for dtype in ("bfloat16", "float32"):
        tracemalloc.start()
        _, loaded = hf.load_pretrained(tmp_path / "ckpt", dtype, place=KEEP)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        sizes = [a.nbytes for a in flat_leaves(loaded).values()]
        # Measured: about sum(sizes) + 0.15 MB; holding the checkpoint then converting is 1.5-2x.
        assert peak < sum(sizes) + 2 * max(sizes), (dtype, peak, sum(sizes), max(sizes))
        del loaded
