"""Non-uniform exports load in stock transformers through moe_jax's remote code.

A tiny model of each family is pruned by a plan that keeps a different number of experts per
layer and a different width per expert, exported, and loaded by transformers with
trust_remote_code=True: every key loads, the logits and 16 greedy tokens equal moe_jax's, and
load_pretrained reads the export back. Without trust_remote_code transformers refuses.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T
from safetensors import safe_open

from moe_jax import hf, pruning
from moe_jax.config import ConfigError
from moe_jax.hf import config_json as hf_config
from moe_jax.model import forward, generate
from tests.conftest import scaled_params, tiny_config

KEEP = lambda p, a: a  # noqa: E731  place=KEEP keeps numpy leaves

# family: (tiny_config overrides, {MoE layer: {kept expert: kept width}}) -- 8 experts of width 24.
CASES = {
    "qwen2_moe": (dict(num_layers=3, dense_layers=(1,)),
                  {0: {0: 24, 2: 10, 3: 17, 5: 5, 7: 24}, 2: {1: 12, 4: 3, 6: 20}}),
    "mixtral": ({}, {0: {1: 7, 2: 24, 5: 13, 6: 2}, 1: {0: 24, 3: 9, 4: 16, 5: 24, 6: 11, 7: 1}}),
    "qwen3_moe": ({}, {0: {0: 5, 1: 24, 4: 18}, 1: {2: 24, 3: 8, 5: 12, 6: 24, 7: 3}}),
    "olmoe": ({}, {0: {0: 24, 3: 6, 4: 15, 5: 9, 7: 24, 1: 20}, 1: {2: 11, 6: 4}}),
    # Two router groups of 4 kept whole; widest kept expert 20, so the shared width (24) is moe_jax's record.
    "deepseek_v3": (dict(num_layers=3, n_group=2, topk_group=1),
                    {1: {0: 20, 1: 7, 2: 12, 3: 3, 4: 20, 5: 16, 6: 9, 7: 14}, 2: {0: 5, 3: 20, 5: 11, 6: 18}}),
    # Four router groups (group-limited greedy, top 2 groups): layer 2 keeps one expert per group.
    "deepseek_v2": (dict(num_layers=3), {1: {0: 24, 1: 4, 2: 13, 3: 24, 4: 8, 5: 19, 6: 24, 7: 2},
                                         2: {1: 10, 2: 24, 5: 6, 7: 15}}),
}


def _pruned(family: str, overrides: dict, keep: dict[int, dict[int, int]]):
    """(cfg, params) of a tiny `family` model compacted by a plan with uneven counts and widths."""
    cfg = tiny_config(family, **overrides)
    params = scaled_params(cfg)
    rng = np.random.default_rng(0)
    plan = pruning.PruningPlan(
        method="test", scope="layer", ratio=0.5,
        source_widths={i: cfg.expert_widths[i] for i in cfg.moe_layers},
        experts={i: tuple(sorted(keep[i])) for i in cfg.moe_layers},
        dims={i: {e: tuple(sorted(rng.choice(cfg.expert_widths[i][e], w, replace=False).tolist()))
                  for e, w in keep[i].items()} for i in cfg.moe_layers})
    cfg2, params2 = pruning.apply(cfg, params, plan)
    assert not cfg2.is_uniform and len({cfg2.experts_per_layer[i] for i in cfg2.moe_layers}) > 1
    return cfg2, _numpy(params2)


def _load_remote(out):
    """transformers' model of the export `out` (remote code), after checking every key loaded as written."""
    model, info = T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                         output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), (kind, info[kind])
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the keys as written, none converted
        assert set(model.state_dict()) == set(f.keys())
    return model.eval()


def _assert_same_logits(model, cfg, params) -> np.ndarray:
    """transformers' logits equal moe_jax's on random tokens (float32); returns the tokens."""
    tokens = np.random.RandomState(0).randint(2, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(forward(cfg, params, tokens))
    assert np.abs(theirs - ours).max() <= 1e-4
    return tokens


def _numpy(tree):
    return {k: _numpy(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree)


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, prefix + (key,)).items()}
    return {prefix: np.asarray(tree)}


@pytest.mark.parametrize("family", list(CASES))
def test_non_uniform_export_loads_in_transformers(family, tmp_path):
    cfg, params = _pruned(family, *CASES[family])
    out = hf.save_pretrained(cfg, params, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "moe_jax_" + family
    assert written["auto_map"] == hf_config.remote_auto_map(family)
    assert written["architectures"] == [written["auto_map"]["AutoModelForCausalLM"].split(".")[1]]
    assert {"configuration_moe_jax.py", "modeling_moe_jax.py"} <= {p.name for p in out.iterdir()}
    if family == "deepseek_v3":  # not n_shared_experts x the widest kept expert: moe_jax's record
        assert written["moe_jax"]["shared_expert_width"] == cfg.shared_expert_width == 24

    # Without trust_remote_code transformers refuses with its own error.
    with pytest.raises(ValueError, match="trust_remote_code"):
        T.AutoModelForCausalLM.from_pretrained(out)

    model = _load_remote(out)
    tokens = _assert_same_logits(model, cfg, params)
    base, info = T.AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                             output_loading_info=True)  # auto_map's AutoModel
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert set(info["unexpected_keys"]) <= {"lm_head.weight"}, info  # as for a stock checkpoint
    with torch.no_grad():
        hidden = base(torch.tensor(tokens)).last_hidden_state
        np.testing.assert_allclose(model.lm_head(hidden).numpy(), model(torch.tensor(tokens)).logits.numpy(),
                                   atol=1e-5)

    prompt = list(tokens[0, :5])  # batched, left-padded generation is test_parity's
    ours_gen = np.asarray(generate(cfg, params, [prompt], max_new_tokens=16))[0]
    with torch.no_grad():
        theirs_gen = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(prompt):]
    np.testing.assert_array_equal(ours_gen, theirs_gen.numpy())

    cfg2, params2 = hf.load_pretrained(out, "float32", place=KEEP)
    assert cfg2 == cfg.replace(hf_extra=cfg2.hf_extra)
    flat, flat2 = _flat(params), _flat(params2)
    assert flat.keys() == flat2.keys()
    for k in flat:
        np.testing.assert_array_equal(flat2[k], flat[k], err_msg="/".join(k))

    # A re-export of what load_pretrained read is the same remote-code export again.
    again = hf.save_pretrained(cfg2, params2, tmp_path / "again")
    assert json.loads((again / "config.json").read_text()) == written


def test_router_groups_of_one_expert(tmp_path):
    """DeepSeek-V3, four router groups, one kept (topk_group=1): layer 2 keeps one expert per group, so
    a group holds one expert and the kept group fewer than top_k, where the stock router fails; the
    remote router routes as moe_jax does. (DeepSeek-V2's stock router handles both: its CASES entry.)"""
    overrides = dict(num_layers=3, topk_group=1)
    keep = {1: {0: 24, 1: 9, 2: 17, 3: 24, 4: 5, 5: 12, 6: 24, 7: 20}, 2: {1: 6, 2: 24, 4: 13, 7: 21}}
    cfg, params = _pruned("deepseek_v3", overrides, keep)
    model = _load_remote(hf.save_pretrained(cfg, params, tmp_path / "out"))
    _assert_same_logits(model, cfg, params)


def test_uneven_router_groups_are_refused():
    cfg = tiny_config("deepseek_v3")  # 8 experts in n_group=4 groups
    with pytest.raises(ConfigError, match="n_group"):
        cfg.with_layer_experts(1, (24,) * 6)
    plan = pruning.PruningPlan(method="test", scope="layer", ratio=0.25, source_widths={1: cfg.expert_widths[1]},
                               experts={1: tuple(range(6))}, dims={1: {e: tuple(range(24)) for e in range(6)}})
    with pytest.raises(pruning.PlanError, match="group"):
        pruning.apply(cfg, scaled_params(cfg), plan)


def test_uniform_export_stays_stock(tmp_path):
    cfg = tiny_config("qwen2_moe")
    out = hf.save_pretrained(cfg, scaled_params(cfg), tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "qwen2_moe" and "auto_map" not in written and "moe_jax" not in written
    assert not list(out.glob("*.py"))
