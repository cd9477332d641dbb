"""Shared fixtures: small configs of every family, built without transformers."""

from __future__ import annotations

import os

import jax
import pytest

from moe_jax.config import ModelConfig

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_config(family: str = "qwen2_moe", **overrides) -> ModelConfig:
    """A few-layer model of `family` small enough to compile in seconds."""
    base = dict(
        model_type=family, vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, num_experts_per_tok=2, max_position_embeddings=128,
    )
    if family == "qwen2_moe":
        base.update(qkv_bias=True, shared_expert_width=40, shared_expert_gate=True, norm_topk_prob=False,
                    dense_intermediate_size=48)
        dense = (1,)
    elif family == "qwen3_moe":
        base.update(qk_norm="head", dense_intermediate_size=48)
        dense = ()
    elif family == "olmoe":
        base.update(qk_norm="full", norm_topk_prob=False)
        dense = ()
    elif family == "mixtral":
        dense = ()
    elif family in ("deepseek_v2", "deepseek_v3"):
        v3 = family == "deepseek_v3"
        base.update(num_kv_heads=4, head_dim=4, kv_lora_rank=16, q_lora_rank=12 if v3 else None,
                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, rope_interleave=True,
                    dense_intermediate_size=48, shared_expert_width=24, router_score="sigmoid" if v3 else "softmax",
                    router_bias=v3, topk_method="noaux_tc" if v3 else "group_limited_greedy", n_group=4,
                    topk_group=2, routed_scaling_factor=2.5 if v3 else 1.0, norm_topk_prob=v3)
        dense = (0,)
    else:
        raise ValueError(family)
    num_experts = overrides.pop("num_experts", 8)
    width = overrides.pop("moe_intermediate_size", 24)
    dense = overrides.pop("dense_layers", dense)
    base.update(overrides)
    return ModelConfig.create(num_experts=num_experts, moe_intermediate_size=width, dense_layers=dense, **base)


def scaled_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.3) -> dict:
    """init() with weights scaled from std 0.02 to `scale` (padding stays zero), so routing and
    masks visibly matter."""
    from moe_jax.model import init

    params = init(cfg, jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map(lambda x: x * (scale / 0.02) if x.ndim > 1 else x, params)


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """A JAX persistent compilation cache shared by the launcher subprocesses of this session.

    The launcher smokes (the quick reproduction's stages, tests/test_reproduce.py) and the notebooks'
    kernels (tests/test_notebooks.py) spend most of their time compiling; many of their programs (the
    skills_tiny model's generate and perplexity steps, the same eval prompts, the same pruned shapes)
    recur across launchers and, for eager ops, inside one launcher. Cache entries are
    keyed by the compiled program, so a changed computation still compiles afresh. Only subprocesses
    and kernels see it: this process imported jax before the variables were set. An explicit
    JAX_COMPILATION_CACHE_DIR in the environment is kept."""
    settings = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_compilation_cache")),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # every compile, even the small eager ones
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}  # no size floor
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        settings = {}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield settings.get("JAX_COMPILATION_CACHE_DIR")
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def rng():
    return jax.random.PRNGKey(0)


def random_hf_qwen2_moe(out_dir, **overrides):
    """A tiny random Qwen2-MoE saved by transformers in `out_dir` (weights std 0.3 so that
    routing matters); skips the test when torch/transformers are missing."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=40, num_experts=8,
                  num_experts_per_tok=2, max_position_embeddings=128)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2MoeConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
    model.save_pretrained(out_dir)
    return out_dir


def transformers_logits(path, tokens):
    """Logits of the checkpoint at `path` as loaded by transformers' own loader."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()
