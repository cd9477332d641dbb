"""Shared fixtures: small configs of every family, built without transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import synthetic
from moe_jax.config import ModelConfig
from moe_jax.data import lm_eval_tasks
from moe_jax.model.layout import pack_experts
from moe_jax.scoring import Scores

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


def random_dim_scores(cfg: ModelConfig, seed: int = 0) -> Scores:
    """Distinct random "fisher" scores for every routed dim, experts of different worth (NaN past a
    width), for selection tests that need no calibration pass."""
    rng = np.random.default_rng(seed)
    values = {}
    for i in cfg.moe_layers:
        arr = np.full((cfg.experts_per_layer[i], cfg.max_width(i)), np.nan)
        for e, w in enumerate(cfg.expert_widths[i]):
            arr[e, :w] = rng.gamma(0.5, size=w) * rng.uniform(0.2, 2.0)
        values[cfg.layer_name(i)] = arr
    widths = {cfg.layer_name(i): tuple(cfg.expert_widths[i]) for i in cfg.moe_layers}
    return Scores({"fisher": values}, widths, num_sequences=1, num_tokens=1)


# init() with weights at std 0.3, so routing and masks visibly matter; its one home is moe_jax.synthetic.
scaled_params = synthetic.scaled_params


# Files whose fixtures run longest (a subprocess reproduction, the 8-device worker, notebook
# kernels, lm-eval launcher runs, two-process jax.distributed) go to the xdist workers first:
# with `--dist loadfile` a long file started last becomes the suite's tail while the other core idles.
SLOW_FILES_FIRST = ("test_reproduce.py", "test_sharding.py", "test_sharding_models.py", "test_notebooks.py",
                    "test_harness.py", "test_papers.py", "test_launcher_quality.py",
                    "test_loader_matrix.py", "test_distributed.py")
_CACHE_SETTINGS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_devices(env: dict, devices: int) -> dict:
    """`env` for a subprocess with `devices` forced host CPU devices (and this run's XLA flags)."""
    return dict(env, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip(),
                JAX_PLATFORMS="cpu")


def pytest_configure(config):
    """Offline Hugging Face settings and one JAX persistent compilation cache for the whole run:
    this process, every xdist worker (they inherit the environment set here, before they start)
    and every subprocess they launch (launcher smokes, the quick reproduction, notebook kernels,
    the sharding worker, the lm-eval launcher).

    Many programs recur across them (the tiny configs' forward and generate steps, the
    skills_tiny model's eval and scoring steps). Entries are keyed by the compiled program, so a
    changed computation compiles afresh. No size cap is set: a cap turns on a file lock and an
    eviction pass that made the workers wait on each other. Without it an entry read while another
    process writes it fails to decompress, and jax then warns and compiles (jax._src.compiler
    `_cache_read`), so sharing stays correct. A JAX_COMPILATION_CACHE_DIR already in the
    environment is kept (and not deleted)."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (or a plain run): a fresh dir for this run
        os.environ.update(JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="moe_jax_test_jax_cache_"),
                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # every compile, even small eager ones
                          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")  # no size floor
        config._moe_jax_cache_dir = os.environ["JAX_COMPILATION_CACHE_DIR"]
    # Compiling tiny programs is most of the suite's time. LLVM at -O0 without its expensive passes
    # compiles them about a quarter faster in-process (more for the launchers). It is CPU codegen only,
    # and both sides of every comparison run under the same flags. Subprocesses inherit it.
    if FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
    if "MOE_JAX_TEST_HF_HOME" not in os.environ:  # the controller: an empty Hugging Face home for this run
        os.environ["MOE_JAX_TEST_HF_HOME"] = tempfile.mkdtemp(prefix="moe_jax_test_hf_home_")
        config._moe_jax_hf_home = os.environ["MOE_JAX_TEST_HF_HOME"]
    # Offline, with empty caches: a test never reaches the network nor a cache of this machine. Set
    # before any test module imports datasets / huggingface_hub, which read these at import.
    os.environ.update(HF_HOME=os.environ["MOE_JAX_TEST_HF_HOME"], HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      TRANSFORMERS_OFFLINE="1")
    os.environ.pop("HF_DATASETS_CACHE", None)
    if hasattr(config.option, "loadscopereorder"):  # xdist would reorder files by test count; keep ours
        config.option.loadscopereorder = False
    # jax read its settings when conftest imported it, before the variables above were set.
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    for name in _CACHE_SETTINGS[1:]:
        if name in os.environ:
            jax.config.update(name.lower(), int(os.environ[name]))


def pytest_unconfigure(config):
    for name in ("_moe_jax_cache_dir", "_moe_jax_hf_home"):
        made = getattr(config, name, None)
        if made and not hasattr(config, "workerinput"):
            shutil.rmtree(made, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Slow files first (stable otherwise); every worker sorts the same way, as xdist requires."""
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def rng():
    return jax.random.PRNGKey(0)


# Tiny Hugging Face configs of the families the HF-facing tests use (transformers class, kwargs).
_HF_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128)
TINY_HF_CONFIGS = {
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=48, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=48, moe_intermediate_size=20, num_experts=8,
                                         num_experts_per_tok=2, head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=28, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8,
                                             qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48,
                                             moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                                             n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)),
}


def random_hf_checkpoint(out_dir, family: str = "qwen2_moe", **overrides):
    """A tiny random checkpoint of `family` saved by transformers in `out_dir` (weights std 0.3 so
    that routing matters); skips the test when torch/transformers are missing."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls_name, family_kwargs = TINY_HF_CONFIGS[family]
    kwargs = {**_HF_COMMON, **family_kwargs, **overrides}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.1)
    model.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- key-map checkpoints (test_hf_load, test_hf_save,
# test_hf_bad_checkpoints): one tiny random checkpoint per variant of the key map the loader must read (MLA with
# and without q LoRA, group-limited routing, dense layers between MoE ones, tied embeddings, attention biases),
# saved by transformers; the oracle maps torch's in-memory names to our tree independently of moe_jax.hf.
KEEP = lambda p, a: a  # noqa: E731  place=KEEP keeps numpy leaves

_KM_SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_experts_per_tok=2)
_KM_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48,
               moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3)
KEYMAP_HF_CONFIGS = {  # name -> (transformers config class, kwargs)
    "mixtral": ("MixtralConfig", dict(**_KM_SMALL, intermediate_size=24, num_hidden_layers=2,
                                      num_key_value_heads=2, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(**_KM_SMALL, intermediate_size=48, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40, num_hidden_layers=3,
                                         num_key_value_heads=2, num_experts=4, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(**_KM_SMALL, intermediate_size=48, moe_intermediate_size=24,
                                         num_hidden_layers=3, num_key_value_heads=2, num_experts=4,
                                         head_dim=16, mlp_only_layers=[0], tie_word_embeddings=True,
                                         attention_bias=True)),
    "olmoe": ("OlmoeConfig", dict(**_KM_SMALL, intermediate_size=24, num_hidden_layers=2,
                                  num_key_value_heads=2, num_experts=4)),
    "deepseek_v2": ("DeepseekV2Config", dict(**_KM_SMALL, **_KM_MLA, n_routed_experts=4, q_lora_rank=None,
                                             topk_method="group_limited_greedy", n_group=2, topk_group=1)),
    "deepseek_v2_qlora": ("DeepseekV2Config", dict(**_KM_SMALL, **_KM_MLA, n_routed_experts=4, q_lora_rank=12,
                                                   attention_bias=True)),
    "deepseek_v3": ("DeepseekV3Config", dict(**_KM_SMALL, **_KM_MLA, n_routed_experts=8, q_lora_rank=12,
                                             n_group=4, topk_group=2)),
}
KEYMAP_FAMILIES = list(KEYMAP_HF_CONFIGS)


def make_keymap_checkpoint(name: str, out: Path, dtype=None) -> dict[str, np.ndarray]:
    """Saves a random tiny model of KEYMAP_HF_CONFIGS[name] to `out` (every tensor random: norms of ones
    and zero biases are a poor oracle); returns its in-memory state dict as float32 numpy."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls_name, kwargs = KEYMAP_HF_CONFIGS[name]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs))
    gen = torch.Generator().manual_seed(KEYMAP_FAMILIES.index(name))
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))
    model = model.to(dtype or torch.float32)
    model.save_pretrained(out)
    return {k: v.float().numpy().copy() for k, v in model.state_dict().items()}


class _KeymapCheckpoints(dict):
    """name -> (path, state dict), each checkpoint made on first use."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str):
        self[name] = (self.root / name, make_keymap_checkpoint(name, self.root / name))
        return self[name]


@pytest.fixture(scope="session")
def keymap_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """The KEYMAP_HF_CONFIGS checkpoints: name -> (path, torch's state dict as float32 numpy). Read-only:
    a test that edits one works on a copy."""
    return _KeymapCheckpoints(tmp_path_factory.mktemp("hf"))


_ATTN_RENAME = {"q_a_layernorm": "q_a_norm", "kv_a_layernorm": "kv_a_norm", "kv_a_proj_with_mqa": "kv_a_proj"}
_NORMS = {"q_norm", "k_norm", "q_a_norm", "kv_a_norm"}


def keymap_oracle(cfg: ModelConfig, sd: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
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


def flat_leaves(params, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    """{path tuple: numpy array} of a nested dict of params."""
    if isinstance(params, dict):
        return {k: v for name, sub in params.items() for k, v in flat_leaves(sub, prefix + (name,)).items()}
    return {prefix: np.asarray(params)}


def assert_same_leaves(a: dict[tuple, np.ndarray], b: dict[tuple, np.ndarray]) -> None:
    """Same keys, shapes and values (compared in float32, exactly)."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32),
                                      err_msg=str(k))

# A small BPE tokenizer whose post-processor can add BOS; its one home is the stand-in task module.
write_bpe_tokenizer = lm_eval_tasks.write_tokenizer


def transformers_logits(path, tokens):
    """Logits of the checkpoint at `path` as loaded by transformers' own loader."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


# ------------------------------------------------------------------ the 8-device sharding worker
SHARDING_MESHES = {"8x1": "data=8", "2x4": "data=2,expert=4", "1x8": "expert=8"}  # data x expert
SHARDING_CHECK_GROUPS = {  # one worker process per group, each launched by its own test file
    "matrix": tuple(f"{op}_{label}" for op in ("forward", "generate", "fisher", "train_step")
                    for label in SHARDING_MESHES),
    "models": ("forward_tensor", "generate_tensor", "params_sharded", "launch_place", "ep_layer", "pruned", "mla"),
}


def run_sharding_worker(group: str, out_dir: Path) -> dict:
    """Run tests/sharding_worker.py's `group` in a process with 8 forced host devices; its results."""
    repo = Path(__file__).resolve().parents[1]
    out = out_dir / "results.json"
    # The fast-compile flags (pytest_configure) are CPU codegen only: the SPMD partitioning under
    # test is unchanged.
    env = with_devices(dict(os.environ), 8)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tests.sharding_worker", group, str(out)], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode or not out.exists():
        pytest.fail(f"sharding worker {group!r} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    results = json.loads(out.read_text())
    print(f"sharding worker {group}:", {k: v.get("s") for k, v in results.items()},
          "wall", round(time.perf_counter() - start, 1), "s")
    return results


def assert_sharding_check(results: dict, name: str) -> None:
    """The worker's check `name` ran and passed (its traceback is the failure message)."""
    result = results.get(name)
    assert result is not None, f"check {name!r} did not run; ran {sorted(results)}"
    assert result["ok"], result["detail"]


# ---------------------------------------------------------------- one MoE layer against loop oracles
# (test_moe, test_trimming)
MOE_D = 16  # hidden size of the one-layer cases
NONUNIFORM_WIDTHS = (8, 8, 12, 16, 16, 24, 32, 32)


def moe_layer_config(num_experts=8, width=16, k=2, **kw) -> ModelConfig:
    base = dict(model_type="qwen2_moe", vocab_size=32, hidden_size=MOE_D, num_layers=1, num_heads=2,
                num_kv_heads=2, head_dim=8, num_experts_per_tok=k)
    base.update(kw)
    return ModelConfig.create(num_experts=num_experts, moe_intermediate_size=width, **base)


def moe_layer_experts(cfg, rng, dtype=np.float32):
    """Per-expert unpadded weights (float64 numpy) and the packed, bucketed params."""
    per_expert = []
    for f in cfg.expert_widths[0]:
        per_expert.append({
            "gate": rng.normal(size=(MOE_D, f)) / np.sqrt(MOE_D),
            "up": rng.normal(size=(MOE_D, f)) / np.sqrt(MOE_D),
            "down": rng.normal(size=(f, MOE_D)) / np.sqrt(f),
        })
    packed = pack_experts(cfg, 0, per_expert)
    packed = jax.tree.map(lambda a: jnp.asarray(a, dtype), packed)
    return per_expert, packed


def experts_oracle(cfg, per_expert, x, idx, weights, dims_mask=None, seq_id=None):
    """y and stats by a loop over tokens and their chosen experts, float64."""
    E, F = cfg.experts_per_layer[0], cfg.max_width(0)
    y = np.zeros((x.shape[0], MOE_D))
    st = {"act_abs_sum": np.zeros((E, F)), "act_weighted_abs_sum": np.zeros((E, F)), "count": np.zeros(E),
          "out_norm_sum": np.zeros(E), "weighted_out_norm_sum": np.zeros(E)}
    for t in range(x.shape[0]):
        for e, w in zip(idx[t], weights[t]):
            p = per_expert[e]
            f = p["gate"].shape[1]
            g, u = x[t] @ p["gate"], x[t] @ p["up"]
            h = g / (1 + np.exp(-g)) * u
            if dims_mask is not None:
                h = h * (dims_mask[e] if dims_mask.ndim == 2 else dims_mask[seq_id[t], e])[:f]
            out = h @ p["down"]
            y[t] += w * out
            st["act_abs_sum"][e, :f] += np.abs(h)
            st["act_weighted_abs_sum"][e, :f] += w * np.abs(h)
            st["count"][e] += 1
            st["out_norm_sum"][e] += np.linalg.norm(out)
            st["weighted_out_norm_sum"][e] += w * np.linalg.norm(out)
    return y, st


def expert_case(scenario, seed=0, T=24):
    """(cfg, per_expert, params, x, idx, w, dims_mask, seq_id) for one scenario.

    uniform: one bucket, no mask. mask_ef / mask_bef: non-uniform widths in three buckets
    ({0, 1} at 8, {2, 3, 4} at 16, {5, 6, 7} at 32) with an (E, F) mask / a (B, E, F) mask and
    seq ids. skewed: non-uniform, expert 3 gets every token, experts 0, 1, 2, 6 none (so the
    whole first bucket is idle).
    """
    rng = np.random.default_rng(seed)
    cfg = moe_layer_config(num_experts=8, width=16, max_width_buckets=3)
    if scenario != "uniform":
        cfg = cfg.with_layer_experts(0, NONUNIFORM_WIDTHS)
    E, K, F = 8, 2, cfg.max_width(0)
    per_expert, params = moe_layer_experts(cfg, rng)
    x = rng.normal(size=(T, MOE_D)).astype(np.float32)
    if scenario == "skewed":
        idx = np.stack([np.full(T, 3), rng.choice([4, 5, 7], size=T)], axis=1)
    else:
        idx = np.stack([rng.choice(E, size=K, replace=False) for _ in range(T)])
    w = rng.uniform(0.1, 1.0, size=(T, K)).astype(np.float32)
    mask, seq = None, None
    if scenario == "mask_ef":
        mask = rng.uniform(0, 1, size=(E, F)).astype(np.float32) * (rng.uniform(size=(E, F)) > 0.3)
    if scenario == "mask_bef":
        B = 3
        mask = rng.uniform(0, 1, size=(B, E, F)).astype(np.float32)
        seq = np.repeat(np.arange(B), T // B).astype(np.int32)
    return cfg, per_expert, params, x, idx.astype(np.int32), w, mask, seq


# ---------------------------------------------------------------- calibration batches (test_scoring, test_layerwise)
def scoring_batches(cfg, n_batches=3, B=3, T=9, seed=0):
    """Pipeline-style batches: packed segments, padding, and answer-only loss masks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        tokens = rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32)
        seg = np.ones((B, T), np.int32)
        seg[0, 5:] = 2  # two packed examples
        seg[1, 7:] = 0  # padding
        loss = (rng.uniform(size=(B, T)) > 0.3).astype(np.float32) * (seg > 0)
        out.append({"tokens": tokens, "segment_ids": seg, "loss_mask": loss})
    return out
