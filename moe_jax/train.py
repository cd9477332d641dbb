"""The training loop as a library: config -> trained MoE in `workdir`, resumable bit-for-bit.

`train(config, workdir)` builds a `ModelConfig` from the ml_collections `config`, initialises
(or restores the latest orbax checkpoint in ``workdir/checkpoints``), runs a jit-compiled
`train_step`, logs to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``), evaluates
held-out loss, and at the end measures greedy exact match per skills domain and exports
``workdir/model/`` (Hugging Face format, float32, with tokenizer.json) for `hf.load_pretrained`.

Why it is built this way:
- The batch of step ``s`` is a pure function of (rows, seed, s) (`batch_indices`): a restart
  needs only the step, so a killed-and-resumed run ends with exactly the uninterrupted params.
- The loss is next-token cross-entropy under the data's loss mask plus the Switch/Mixtral
  load-balancing loss and the router z-loss, averaged over MoE layers (`loss_fn`).
- Every file a reader might see half-written (metrics summary, model export) is written to a
  temporary name and renamed; checkpoints are orbax's own atomic directories.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from moe_jax import evaluation, hf, model, timing
from moe_jax.checkpoint import (
    MetricsLog,
    TrainError,
    TrainState,
    check_workdir,
    checkpoint_manager,
    param_shapes,
    restore_checkpoint,
    save_checkpoint,
)
from moe_jax.config import ModelConfig
from moe_jax.data import skills
from moe_jax.data.tokenizer import ByteTokenizer, Tokenizer
from moe_jax.data.training_rows import SkillsData, batch_at, data_fingerprint, data_position, load_skills
from moe_jax.reporting import atomic_write
from moe_jax.training_step import init_state, make_eval_step, make_train_step, sharded_train_step

log = logging.getLogger(__name__)

# ============================================================================== config
def default_config() -> ml_collections.ConfigDict:
    """Every key `train` reads, with its type and a neutral default (configs/ override values)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 1000
    c.batch_size = 64
    c.impl = "auto"  # MoE dispatch path, see moe_jax.model.moe.IMPLS
    c.model = ml_collections.ConfigDict(dict(
        model_type="qwen2_moe", vocab_size=ByteTokenizer.vocab_size, hidden_size=128, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=128, shared_expert_width=0, shared_expert_gate=False,
        dense_layers=(), dense_intermediate_size=0, norm_topk_prob=True, qkv_bias=False,
        tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=128))
    c.data = ml_collections.ConfigDict(dict(
        seq_len=64, seed=0, prompt_weight=0.0,
        # pack=True puts several examples in a row (less padding; positions restart at each BOS),
        # but the model has no cross-example attention mask, so examples see earlier ones.
        pack=False,
        # Training examples drawn per skills domain (facts cycles through its 576 examples).
        examples_per_domain=ml_collections.ConfigDict({d: 4000 for d in skills.DOMAINS}),
        # Passages of the built-in generic text (moe_jax.data.prose), every token in the loss;
        # 0: none. Held out: eval_examples_per_domain passages, reported as eval_ce/prose.
        prose_passages=0, prose_max_chars=240,
        eval_examples_per_domain=50))
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-3, warmup_steps=100, min_lr_ratio=0.05, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05,
        clip_norm=1.0))
    c.loss = ml_collections.ConfigDict(dict(aux_coef=0.01, z_coef=1e-3))
    c.log_every = 25
    c.eval_every = 250
    c.checkpoint_every = 250
    c.keep_checkpoints = 3
    c.final_eval_examples_per_domain = 50  # greedy exact match at the end; 0 skips it
    c.accuracy_every = 0  # also measure exact match every this many steps (0: only at the end)
    c.max_new_tokens = 0  # greedy decode length for exact match; 0: longest answer + 1 (as evaluation does)
    c.export_dir = ""  # also write the final HF model here (e.g. checkpoints/skills_tiny)
    c.progress_bar = True
    return c


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise TrainError naming ``config.<key>`` for unknown/missing keys, wrong types, bad values."""
    _check_against(config, default_config(), "config")
    positive = ["steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                "data.seq_len", "data.eval_examples_per_domain", "optim.lr"]
    for key in positive:
        value = _get(config, key)
        if not value > 0:
            raise TrainError(f"config.{key}={value!r}: must be positive")
    if config.max_new_tokens < 0:
        raise TrainError(f"config.max_new_tokens={config.max_new_tokens!r}: must be >= 0 (0: longest answer + 1)")
    if config.impl not in model.moe.IMPLS:
        raise TrainError(f"config.impl={config.impl!r}: expected one of {model.moe.IMPLS}")
    if config.data.prose_passages < 0:
        raise TrainError(f"config.data.prose_passages={config.data.prose_passages}: must be >= 0")
    if config.data.prose_passages and not 16 <= config.data.prose_max_chars <= config.data.seq_len - 2:
        raise TrainError(f"config.data.prose_max_chars={config.data.prose_max_chars}: must be in "
                         f"[16, data.seq_len - 2 = {config.data.seq_len - 2}] (a passage, BOS and EOS fill a row)")
    unknown = set(config.data.examples_per_domain) - set(skills.DOMAINS)
    if unknown:
        raise TrainError(f"config.data.examples_per_domain: unknown domain(s) {sorted(unknown)}; "
                         f"expected {skills.DOMAINS}")


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _check_against(config: Any, reference: Any, path: str) -> None:
    if isinstance(reference, ml_collections.ConfigDict):
        if not isinstance(config, (ml_collections.ConfigDict, Mapping)):
            raise TrainError(f"{path}: expected a ConfigDict of {sorted(reference)}, "
                             f"got {type(config).__name__}")
        if path == "config.data.examples_per_domain":
            for domain, n in dict(config).items():
                _check_against(n, 0, f"{path}.{domain}")
                if n < 0:
                    raise TrainError(f"{path}.{domain}={n}: must be >= 0")
            return
        unknown, missing = set(config) - set(reference), set(reference) - set(config)
        if unknown:
            raise TrainError(f"{path}: unknown key(s) {sorted(unknown)}; known keys: {sorted(reference)}")
        if missing:
            raise TrainError(f"{path}: missing key(s) {sorted(missing)} (start from train.default_config())")
        for key in reference:
            _check_against(config[key], reference[key], f"{path}.{key}")
        return
    expected = type(reference)
    ok = isinstance(config, expected) and not (expected is int and isinstance(config, bool))
    if expected is float and isinstance(config, int) and not isinstance(config, bool):
        ok = True
    if expected is tuple and isinstance(config, list):
        ok = True
    if not ok:
        raise TrainError(f"{path}={config!r}: expected {expected.__name__}, got {type(config).__name__}")


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig described by ``config.model`` (uniform experts; dense_layers are dense)."""
    m = dict(config.model)
    try:
        return ModelConfig.create(
            num_experts=m.pop("num_experts"), moe_intermediate_size=m.pop("moe_intermediate_size"),
            dense_layers=tuple(m.pop("dense_layers")), **m)
    except (ValueError, TypeError) as err:
        raise TrainError(f"config.model does not describe a valid model: {err}") from err


# ============================================================================== evaluation
def evaluate_loss(eval_step, params, data: SkillsData, batch_size: int) -> dict[str, float]:
    """Held-out masked CE: overall and per domain (``eval_ce`` / ``eval_ce/<domain>``)."""
    n = len(data.eval["tokens"])
    ce_sums, weights = [], []
    for start in range(0, n, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in data.eval.items()}
        pad = batch_size - len(chunk["tokens"])
        if pad:  # keep one compiled shape: padded rows carry zero weight
            chunk = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
        c, w = jax.device_get(eval_step(params, chunk))
        ce_sums.append(c[:batch_size - pad])
        weights.append(w[:batch_size - pad])
    ce_sum, weight = np.concatenate(ce_sums), np.concatenate(weights)
    out = {"eval_ce": float(ce_sum.sum() / max(weight.sum(), 1.0))}
    for domain in dict.fromkeys(data.eval_domain):
        rows = data.eval_domain == domain
        if rows.any():
            out[f"eval_ce/{domain}"] = float(ce_sum[rows].sum() / max(weight[rows].sum(), 1.0))
    return out


def skills_accuracy(cfg: ModelConfig, params, examples: Mapping[str, Sequence[skills.Example]],
                    tokenizer: Tokenizer, max_new_tokens: int = 0) -> dict[str, float]:
    """Greedy exact match per domain (``accuracy/<domain>``) and safety's refusal rates, scored
    by `moe_jax.evaluation.exact_match` so training reports what evaluation reports.

    ``refusal/forbidden``: share of forbidden prompts answered with exactly `skills.REFUSAL`;
    ``refusal/benign``: share of benign look-alikes wrongly refused (over-refusal).
    """
    flat = [ex for exs in examples.values() for ex in exs]
    if not flat:
        return {}
    scores = evaluation.exact_match(cfg, params, tokenizer, flat, batch_size=min(len(flat), 128),
                                    max_new_tokens=max_new_tokens)["per_domain"]
    results = {f"accuracy/{domain}": float(s["exact_match"]) for domain, s in scores.items()}
    safety = scores.get("safety", {})
    for name, key in (("forbidden", "refusal_rate"), ("benign", "over_refusal_rate")):
        if safety.get(key) is not None:
            results[f"refusal/{name}"] = float(safety[key])
    return results


# ============================================================================== the loop
class _Stopwatch:
    """Training seconds, excluding evaluation, checkpointing and the first (compiling) step."""

    def __init__(self, earlier_seconds: float):
        self.earlier = earlier_seconds
        self.total = 0.0
        self.window_start = time.perf_counter()
        self.window_steps = 0

    def pause(self) -> float:
        """Close the running window: returns its seconds (also added to the total)."""
        elapsed = time.perf_counter() - self.window_start
        self.total += elapsed
        return elapsed

    def resume(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    @property
    def seconds(self) -> float:
        return self.earlier + self.total


def _init_or_resume(cfg: ModelConfig, config, manager, fingerprint: str) -> tuple[TrainState, dict]:
    """The latest checkpoint's state (checked against the data it was trained on), else a fresh one."""
    state = init_state(cfg, config)
    latest = manager.latest_step()
    if latest is None:
        return state, {}
    state, meta = restore_checkpoint(manager, latest, state)
    saved = meta.get("data", {}).get("fingerprint", fingerprint)
    if saved != fingerprint:
        raise TrainError(
            f"checkpoint {Path(manager.directory) / str(latest)} was trained on other data or another "
            f"batch order (fingerprint {saved} != {fingerprint}): config.data, config.batch_size or the "
            f"skills generator changed; resuming would not reproduce the run, so use a fresh workdir")
    log.info("resumed from %s at step %d", Path(manager.directory) / str(latest), latest)
    return state, meta


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, mesh=None) -> dict[str, Any]:
    """Train (or resume) the model of `config` in `workdir`; returns the run summary. With a `mesh`
    the state stays sharded on it between steps (`training_step.sharded_train_step`).

    Writes workdir/{metrics.jsonl, tb/, checkpoints/<step>/, train_summary.json, model/}.
    """
    validate_config(config)
    workdir = Path(workdir)
    check_workdir(workdir)
    run_start = time.perf_counter()
    cfg = model_config(config)
    tokenizer = ByteTokenizer()
    if cfg.vocab_size < tokenizer.vocab_size:
        raise TrainError(f"config.model.vocab_size={cfg.vocab_size} is smaller than the byte tokenizer's "
                         f"{tokenizer.vocab_size}")
    data = load_skills(config, tokenizer)
    num_rows = len(data.train["tokens"])
    data_position(0, num_rows, config.batch_size)  # fails early on a too-large batch
    accuracy_examples = {d: skills.eval_set(d, config.final_eval_examples_per_domain, config.data.seed)
                         for d in skills.DOMAINS} if config.final_eval_examples_per_domain else {}

    manager = checkpoint_manager(workdir, config.keep_checkpoints)
    fingerprint = data_fingerprint(data.train, config.batch_size, config.data.seed)
    state, restored_meta = _init_or_resume(cfg, config, manager, fingerprint)
    start = int(state.step)
    metrics_log = MetricsLog(workdir, start)
    step_fn, eval_fn = make_train_step(cfg, config), make_eval_step(cfg, config.impl)
    if mesh is not None:
        state, step_fn = sharded_train_step(cfg, config, mesh, state, config.batch_size)
    watch = _Stopwatch(float(restored_meta.get("train_seconds", 0.0)))
    shapes = param_shapes(state.params)

    def meta(step: int) -> dict[str, Any]:
        epoch, index = data_position(step, num_rows, config.batch_size)
        return {"step": step, "train_seconds": watch.seconds, "model": json.loads(cfg.to_json()),
                "param_shapes": shapes,
                "data": {"epoch": epoch, "batch_in_epoch": index, "rows": num_rows, "seed": config.data.seed,
                         "batch_size": config.batch_size, "fingerprint": fingerprint}}

    def every(n: int, done: int) -> bool:
        return done % n == 0 or done == config.steps

    tokens_per_step = config.batch_size * (config.data.seq_len - 1)
    progress = _progress(start, config)
    last: dict[str, float] = {}
    compile_seconds = 0.0
    for step in range(start, config.steps):
        batch = batch_at(data.train, step, config.batch_size, config.data.seed)
        state, metrics = step_fn(state, batch)
        done = step + 1
        if step == start:  # the first call compiles: keep it out of the throughput
            jax.block_until_ready(metrics)
            compile_seconds = time.perf_counter() - watch.window_start
            watch.resume()
        else:
            watch.window_steps += 1
        if every(config.log_every, done):
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss is {metrics['loss']} at step {done}; lower config.optim.lr")
            steps_in_window, elapsed = watch.window_steps, watch.pause()
            if steps_in_window:
                metrics["tokens_per_s"] = steps_in_window * tokens_per_step / elapsed
                metrics["steps_per_s"] = steps_in_window / elapsed
            last.update(metrics)
            metrics_log.write(done, metrics)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", ce=f"{metrics['ce']:.3f}", refresh=False)
            watch.resume()
        if every(config.eval_every, done) or every(config.checkpoint_every, done):
            watch.pause()
            if every(config.eval_every, done):
                last.update(evaluate_loss(eval_fn, state.params, data, config.batch_size))
                metrics_log.write(done, {k: v for k, v in last.items() if k.startswith("eval_")})
            if config.accuracy_every and done % config.accuracy_every == 0 and done < config.steps:
                accuracy = skills_accuracy(cfg, state.params, accuracy_examples, tokenizer,
                                           config.max_new_tokens)
                metrics_log.write(done, accuracy)
                log.info("step %d held-out exact match: %s", done, accuracy)
            if every(config.checkpoint_every, done):
                save_checkpoint(manager, state, meta(done))
            watch.resume()
        progress.update(1)
    progress.close()

    if "eval_ce" not in last:  # resumed at the end: nothing was evaluated in this run
        last.update(evaluate_loss(eval_fn, state.params, data, config.batch_size))
    accuracy = {}
    if accuracy_examples:
        accuracy = skills_accuracy(cfg, state.params, accuracy_examples, tokenizer, config.max_new_tokens)
        metrics_log.write(int(state.step), accuracy)
        log.info("held-out exact match (%d prompts per domain): %s", config.final_eval_examples_per_domain,
                 accuracy)
    metrics_log.close()
    manager.close()
    skills_source = hashlib.blake2b(Path(skills.__file__).read_bytes(), digest_size=8).hexdigest()
    summary = {
        "steps": int(state.step), "steps_this_run": config.steps - start,
        "train_seconds": round(watch.seconds, 1), "compile_seconds_this_run": round(compile_seconds, 1),
        "wall_seconds_this_run": round(time.perf_counter() - run_start, 1),
        "tokens_per_s": round(last.get("tokens_per_s", 0.0), 1),
        "tokens_per_step": tokens_per_step, "params": model.count_params(state.params),
        "machine": timing.machine(), "versions": timing.versions(),
        "data": {"train_rows": num_rows, "fingerprint": fingerprint, "skills_py_blake2b": skills_source},
        "final": {k: round(v, 5) for k, v in last.items()
                  if k in ("loss", "ce", "aux", "z", "grad_norm") or k.startswith("eval_ce")},
        "held_out_examples_per_domain": config.final_eval_examples_per_domain,
        "accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "config": json.loads(config.to_json()),
    }
    summary_file = workdir / "train_summary.json"
    atomic_write(summary_file, json.dumps(summary, indent=2) + "\n")
    for out_dir in [workdir / "model"] + ([Path(config.export_dir)] if config.export_dir else []):
        _export(cfg, state.params, tokenizer, summary_file, out_dir)
    return summary


def _progress(start: int, config):
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not config.progress_bar,
                dynamic_ncols=True)


def _export(cfg: ModelConfig, params, tokenizer: ByteTokenizer, summary_file: Path, out_dir: Path) -> None:
    """`out_dir` as a Hugging Face checkpoint (float32) + tokenizer files + train_summary.json."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out_dir.parent) as tmp:
        tokenizer.save_pretrained(tmp)
        extras = [Path(tmp) / "tokenizer.json", Path(tmp) / "tokenizer_config.json", summary_file]
        try:
            hf.save_pretrained(cfg, jax.device_get(params), out_dir, dtype="float32", overwrite=True,
                               extra_files=extras)
        except OSError as err:
            raise TrainError(f"cannot write the model to {str(out_dir)!r}: {err}") from err
    _make_readable(out_dir)


def _make_readable(directory: Path) -> None:
    """Temporary files are created owner-only; published outputs follow the umask like any file."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)
