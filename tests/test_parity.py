"""Parity with transformers, the independent oracle: logits and greedy tokens of tiny random
models of every family, through both directions of checkpoint conversion."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax import hf  # noqa: E402
from moe_jax.model import forward, generate  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_key_value_heads=4,
           moe_intermediate_size=24, intermediate_size=48, n_shared_experts=1, first_k_dense_replace=1)
CASES = {
    "mixtral_gqa_window": ("MixtralConfig", dict(intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
                                                 num_experts_per_tok=2, sliding_window=6)),
    "qwen2_moe_shared_dense": ("Qwen2MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24,
                                                      shared_expert_intermediate_size=40, num_key_value_heads=2,
                                                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])),
    "qwen2_moe_norm_topk": ("Qwen2MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24,
                                                   shared_expert_intermediate_size=40, num_experts=6,
                                                   num_key_value_heads=4,
                                                   num_experts_per_tok=3, norm_topk_prob=True)),
    "qwen3_moe_qknorm": ("Qwen3MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24, num_key_value_heads=2,
                                                num_experts=6, num_experts_per_tok=2, head_dim=16,
                                                norm_topk_prob=True)),
    "qwen3_moe_no_norm_tied": ("Qwen3MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24,
                                                      num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                                                      norm_topk_prob=False, tie_word_embeddings=True)),
    "olmoe_fullnorm_clip": ("OlmoeConfig", dict(intermediate_size=24, num_key_value_heads=2, num_experts=4,
                                                num_experts_per_tok=2, clip_qkv=0.5, eos_token_id=1)),
    "deepseek_v2_group_limited": ("DeepseekV2Config", dict(MLA, q_lora_rank=None, n_routed_experts=8,
                                                           num_experts_per_tok=2, topk_method="group_limited_greedy",
                                                           n_group=4, topk_group=2, routed_scaling_factor=1.5)),
    "deepseek_v2_greedy_qlora": ("DeepseekV2Config", dict(MLA, q_lora_rank=12, n_routed_experts=4,
                                                          num_experts_per_tok=2, topk_method="greedy")),
    "deepseek_v3_sigmoid_bias_groups": ("DeepseekV3Config", dict(MLA, q_lora_rank=12, n_routed_experts=8,
                                                                 num_experts_per_tok=2, n_group=4, topk_group=2)),
    "deepseek_v3_yarn": ("DeepseekV3Config", dict(MLA, q_lora_rank=12, n_routed_experts=8, num_experts_per_tok=3,
                                                  n_group=2, topk_group=1, rope_parameters={
                                                      "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "original_max_position_embeddings": 64, "mscale": 1.0,
                                                      "mscale_all_dim": 1.0})),
}


def _torch_model(case: str):
    cls_name, kwargs = CASES[case]
    hf_cfg = getattr(transformers, cls_name)(**BASE, **kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so routing decisions matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    model = _torch_model(case)
    model.save_pretrained(tmp_path / "theirs")
    cfg, params = hf.load_pretrained(tmp_path / "theirs", dtype="float32")
    tokens = np.random.RandomState(0).randint(2, 96, (2, 14))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(forward(cfg, params, tokens))
    assert np.abs(ours - ref).max() <= 1e-4

    # Our export, read by transformers, gives the same logits again.
    hf.save_pretrained(cfg, params, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(torch.tensor(tokens)).logits.numpy()
    assert np.abs(again - ours).max() <= 1e-4

    # Greedy generation of 16 tokens, batched with left padding on our side.
    prompts = [list(tokens[0, :5]), list(tokens[1, :3])]
    ours_gen = generate(cfg, params, prompts, max_new_tokens=16)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            theirs = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                    pad_token_id=0, eos_token_id=None)[0, len(prompt):].numpy()
        np.testing.assert_array_equal(ours_gen[i], theirs)
