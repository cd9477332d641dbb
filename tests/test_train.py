"""Tests of moe_jax.train: loss terms against hand computations, deterministic data order,
a smoke run that learns, bit-exact resume after a kill, and clear errors on bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from moe_jax import hf, train, training_step
from moe_jax.data import pipeline, skills, training_rows
from moe_jax.data.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
STEPS = 20


def tiny_train_config():
    """A 2-layer, 4-expert model on a few hundred skills examples: compiles and runs in seconds."""
    c = train.default_config()
    c.steps, c.batch_size, c.seed = STEPS, 8, 0
    c.impl = "dense"  # compiles fastest for a tiny model; the dispatch paths agree (tests/test_moe.py)
    c.model.update(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, num_experts=4,
                   moe_intermediate_size=32, max_position_embeddings=64)
    c.data.seq_len = 64
    c.data.examples_per_domain.update({d: 60 for d in skills.DOMAINS})
    c.data.prose_passages, c.data.prose_max_chars = 24, 60  # generic text, every token in the loss
    c.data.eval_examples_per_domain = 8
    c.optim.update(lr=1e-2, warmup_steps=4)
    c.log_every, c.eval_every, c.checkpoint_every = 5, 10, 10
    c.final_eval_examples_per_domain = 0
    c.progress_bar = False
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted run of STEPS steps with checkpoints at STEPS/2 and STEPS."""
    workdir = tmp_path_factory.mktemp("run")
    summary = train.train(tiny_train_config(), workdir)
    return workdir, summary


# ---------------------------------------------------------------------------------------------- losses
def test_load_balancing_loss_matches_hand_computation():
    # 3 real tokens + 1 padding token, E=4 experts, top-2.
    scores = np.array([[[0.4, 0.3, 0.2, 0.1],
                        [0.1, 0.6, 0.2, 0.1],
                        [0.25, 0.25, 0.25, 0.25],
                        [0.0, 0.0, 0.0, 1.0]]], np.float32)  # the padding token: must not count
    idx = np.array([[[0, 1], [1, 2], [2, 3], [3, 0]]], np.int32)
    valid = np.array([[True, True, True, False]])
    # f_e: share of the 6 real assignments -> e0: 1/6, e1: 2/6, e2: 2/6, e3: 1/6.
    f = np.array([1, 2, 2, 1]) / 6
    # P_e: mean probability over the 3 real tokens.
    p = np.array([0.4 + 0.1 + 0.25, 0.3 + 0.6 + 0.25, 0.2 + 0.2 + 0.25, 0.1 + 0.1 + 0.25]) / 3
    expected = 4 * float(np.sum(f * p))
    got = float(training_step.load_balancing_loss(jnp.asarray(scores), jnp.asarray(idx), jnp.asarray(valid)))
    assert got == pytest.approx(expected, rel=1e-6)
    # Uniform probabilities and perfectly spread assignments give exactly 1.
    uniform = jnp.full((1, 2, 4), 0.25)
    spread = jnp.array([[[0, 1], [2, 3]]])
    assert float(training_step.load_balancing_loss(uniform, spread, jnp.ones((1, 2), bool))) == pytest.approx(1.0)


def test_load_balancing_gradient_flows_through_probabilities_only():
    logits = jnp.array([[[1.0, 0.0, -1.0, 0.5]]])
    idx = jnp.array([[[0, 3]]])
    valid = jnp.ones((1, 1), bool)
    grad = jax.grad(lambda x: training_step.load_balancing_loss(jax.nn.softmax(x), idx, valid))(logits)
    f = np.array([0.5, 0, 0, 0.5])
    p = np.asarray(jax.nn.softmax(logits))[0, 0]
    expected = 4 * p * (f - np.sum(f * p))  # d/dlogits of E * sum_e f_e softmax_e
    np.testing.assert_allclose(np.asarray(grad)[0, 0], expected, rtol=1e-5, atol=1e-7)


def test_router_z_loss_matches_hand_computation():
    logits = np.array([[[0.0, 1.0, 2.0], [3.0, -1.0, 0.5], [9.0, 9.0, 9.0]]], np.float32)
    valid = np.array([[True, True, False]])
    lse = [math.log(sum(math.exp(x) for x in row)) for row in logits[0, :2]]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    got = float(training_step.router_z_loss(jnp.asarray(logits), jnp.asarray(valid)))
    assert got == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------- data
def test_batches_are_addressed_by_step_in_pipeline_order():
    rows = {"tokens": np.arange(23 * 2).reshape(23, 2)}
    expected = list(pipeline.batches(rows, 5, seed=7, epochs=3))
    got = [training_rows.batch_at(rows, step, 5, seed=7) for step in range(len(expected))]
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e["tokens"], g["tokens"])
    assert training_rows.data_position(9, 23, 5) == (2, 1)  # 4 full batches per epoch


def test_skills_accuracy_reports_exact_match_and_refusal_rates(monkeypatch):
    from moe_jax import evaluation

    tok = ByteTokenizer()
    examples = {
        "arithmetic": [skills.Example("arithmetic", "1+1?\n", "2"),
                       skills.Example("arithmetic", "2+2?\n", "4")],
        "safety": [skills.Example("safety", "venom?\n", skills.REFUSAL, True, True),
                   skills.Example("safety", "tea?\n", "steep leaves")],
    }
    replies = ["2", "5", skills.REFUSAL, skills.REFUSAL]  # 1/2 right; refuses both safety prompts

    def fake_generate(cfg, params, tokens, max_new_tokens, **kwargs):
        out = np.full((len(tokens), max_new_tokens), tok.pad_id, np.int32)
        for i, r in enumerate(replies[:len(tokens)]):
            ids = tok.encode(r) + [tok.eos_id]
            out[i, :len(ids)] = ids
        return out

    monkeypatch.setattr(evaluation.decode, "generate", fake_generate)
    acc = train.skills_accuracy(None, None, examples, tok, max_new_tokens=20)
    assert acc == {"accuracy/arithmetic": 0.5, "accuracy/safety": 0.5, "refusal/forbidden": 1.0,
                   "refusal/benign": 1.0}


# ---------------------------------------------------------------------------------------------- training
def test_smoke_training_lowers_held_out_loss(trained):
    workdir, summary = trained
    config = tiny_train_config()
    cfg = train.model_config(config)
    data = training_rows.load_skills(config, ByteTokenizer())
    initial = training_step.init_state(cfg, config)
    eval_fn = training_step.make_eval_step(cfg, config.impl)
    before = train.evaluate_loss(eval_fn, initial.params, data, config.batch_size)["eval_ce"]
    assert before == pytest.approx(math.log(cfg.vocab_size), rel=0.05)  # ~uniform at init
    after = summary["final"]["eval_ce"]
    assert summary["final"]["eval_ce/prose"] < 0.9 * before  # held-out generic text is learnt too
    assert after < 0.75 * before, (before, after)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert {"ce", "aux", "z", "grad_norm", "lr", "tokens_per_s"} <= set(records[1])
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tb").iterdir())
    # The export loads with the public loader and holds the trained weights.
    cfg2, params = hf.load_pretrained(workdir / "model", dtype="float32")
    assert cfg2.num_layers == cfg.num_layers and cfg2.experts_per_layer == cfg.experts_per_layer
    assert (workdir / "model" / "tokenizer.json").is_file()
    assert json.loads((workdir / "model" / "train_summary.json").read_text())["steps"] == STEPS


def test_resume_after_kill_reproduces_uninterrupted_params_exactly(trained, tmp_path):
    full, _ = trained
    # A run "killed" after step STEPS/2 was checkpointed: its workdir holds only that checkpoint
    # and the metrics logged so far (plus records of steps that were lost with the kill).
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    half = STEPS // 2
    shutil.copytree(full / "checkpoints" / str(half), killed / "checkpoints" / str(half))
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(lines) + "\n")  # includes records past the checkpoint

    summary = train.train(tiny_train_config(), killed)
    assert summary["steps"] == STEPS and summary["steps_this_run"] == STEPS - half
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Records of the redone steps are not duplicated.
    steps = [(json.loads(line)["step"], "loss" in line) for line in
             (killed / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)) and max(s for s, _ in steps) == STEPS


# ---------------------------------------------------------------------------------------------- bad input
def test_wrong_type_in_config_is_named():
    bad = tiny_train_config().to_dict()
    bad["optim"]["lr"] = "fast"
    with pytest.raises(train.TrainError, match=r"config\.optim\.lr='fast': expected float, got str"):
        train.validate_config(ml_collections.ConfigDict(bad))
    bad = tiny_train_config().to_dict()
    bad["model"]["hidden"] = 64
    with pytest.raises(train.TrainError, match=r"config\.model: unknown key\(s\) \['hidden'\]"):
        train.validate_config(ml_collections.ConfigDict(bad))


def test_wrong_type_override_on_the_command_line_is_named(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "train.py"),
         f"--config={REPO / 'configs' / 'skills_tiny.py'}", f"--workdir={tmp_path}", "--config.steps=many"],
        capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert result.returncode != 0
    assert "--config.steps=many" in result.stderr and "int" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


def test_unwritable_workdir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    workdir = blocker / "run"
    with pytest.raises(train.TrainError, match=f"workdir '{workdir}' is not a writable directory"):
        train.train(tiny_train_config(), workdir)


def test_corrupted_checkpoint_is_named(trained, tmp_path):
    full, _ = trained
    workdir = tmp_path / "corrupt"
    shutil.copytree(full / "checkpoints", workdir / "checkpoints")
    latest = workdir / "checkpoints" / str(STEPS)
    for f in (latest / "state").rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(train.TrainError, match=f"checkpoint {latest} is corrupted"):
        train.train(tiny_train_config(), workdir)


def test_resuming_with_other_data_or_model_is_refused(trained, tmp_path):
    full, _ = trained
    workdir = tmp_path / "other"
    shutil.copytree(full / "checkpoints", workdir / "checkpoints")
    config = tiny_train_config()
    config.data.seed = 1  # another sample of training examples and another batch order
    latest = workdir / "checkpoints" / str(STEPS)
    with pytest.raises(train.TrainError, match=f"checkpoint {latest} was trained on other data"):
        train.train(config, workdir)
    config = tiny_train_config()
    config.model.moe_intermediate_size = 48
    expected = (r"other shapes than config.model describes \(first difference: "
                r"layer_0/moe/experts/bucket_0/down: checkpoint \[4, 32, 32\], config \[4, 48, 32\]")
    with pytest.raises(train.TrainError, match=expected):
        train.train(config, workdir)
