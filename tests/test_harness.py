"""moe_jax.harness.MoeJaxLM against lm-eval's own HF backend (HFLM), the independent oracle.

Both evaluate the same tiny random checkpoint (written by transformers) with the same tokenizer
on local tasks of the three request types, through `lm_eval.simple_evaluate`; every request's
result and every metric must agree. Then what only moe_jax can evaluate: a non-uniform pruning
plan as masks equals the compacted model, a trimming policy changes exactly what it should, and
bad input fails with a message naming it. Everything runs offline (conftest.py sets it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from lm_eval import evaluator  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from moe_jax import hf, pruning  # noqa: E402
from moe_jax.data.lm_eval_tasks import TASKS as LM_EVAL_TASKS  # noqa: E402
from moe_jax.data.lm_eval_tasks import write as write_lm_eval_tasks  # noqa: E402
from moe_jax.harness import HarnessError, MoeJaxLM, load_tasks, task_manager  # noqa: E402
from moe_jax.pruning import PlanError, PruningPlan  # noqa: E402
from moe_jax.trimming import LayerTrim, RouterDriftError, TrimmingError, TrimmingPolicy  # noqa: E402
from tests.conftest import random_hf_checkpoint, with_devices, write_bpe_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 32  # small, so rolling documents span several windows and long prompts are truncated
# family -> does its tokenizer add BOS (Mixtral's and DeepSeek's do, Qwen's does not)
FAMILIES = {"qwen2_moe": False, "mixtral": True, "deepseek_v3": True}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """(task directory, lm-eval's task index including it): indexing reads every stock task YAML, so once."""
    root = write_lm_eval_tasks(tmp_path_factory.mktemp("tasks"))
    return root, task_manager(root)


def checkpoint(tmp_path, family: str):
    out = tmp_path / family
    random_hf_checkpoint(out, family, vocab_size=128)
    write_bpe_tokenizer(out, add_bos=FAMILIES[family])
    return out


def evaluate(lm, manager):
    return evaluator.simple_evaluate(model=lm, tasks=list(LM_EVAL_TASKS), task_manager=manager, log_samples=True,
                                     bootstrap_iters=0, random_seed=0)


def flat_responses(result, task):
    """Per request: the model's raw response (a (logprob, is_greedy) pair, a float or a string)."""
    return [resp for sample in result["samples"][task] for resp in sample["resps"]]


def assert_same_responses(theirs, ours, atol=1e-4):
    assert len(theirs) == len(ours)
    for t, o in zip(theirs, ours, strict=True):
        t, o = t[0], o[0]
        if isinstance(t, str):
            assert o == t
        elif isinstance(t, tuple):
            assert abs(o[0] - t[0]) <= atol and o[1] == t[1], (t, o)
        else:
            assert abs(o - t) <= atol, (t, o)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_request_and_metric_matches_lm_evals_hf_backend(family, tmp_path, tasks):
    path, manager = checkpoint(tmp_path, family), tasks[1]
    oracle = HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=3, max_length=MAX_LENGTH)
    ours = MoeJaxLM.from_pretrained(path, batch_size=3, max_length=MAX_LENGTH)
    assert ours.tok_encode("what is two plus three?") == oracle.tok_encode("what is two plus three?")
    assert (ours.tok_encode("fox")[0] == 1) == FAMILIES[family]  # BOS exactly where the tokenizer adds one
    theirs, mine = evaluate(oracle, manager), evaluate(ours, manager)
    for task in LM_EVAL_TASKS:
        assert_same_responses(flat_responses(theirs, task), flat_responses(mine, task))
        for key, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert mine["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
            else:
                assert mine["results"][task][key] == value, (task, key)
    # Several rolling windows per document, and left truncation of a few-shot prompt, were exercised.
    text = max(s["doc"]["text"] for s in theirs["samples"]["tiny_text"])
    assert len(ours.tok_encode(text)) > 3 * MAX_LENGTH
    assert max(len(ours.tok_encode(s["arguments"][0][0])) for s in mine["samples"]["tiny_gsm"]) > MAX_LENGTH - 12

    # is_greedy is True on what the model itself generates, in both backends.
    contexts = ["The quick brown fox", "Experts route", "A router picks the", "what is two plus"]
    generated = ours.generate_until([Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 6}), i)
                                     for i, c in enumerate(contexts)])
    assert generated == oracle.generate_until([Instance("generate_until", {}, (c, {"until": ["\n\n"],
                                                                                    "max_gen_toks": 6}), i)
                                               for i, c in enumerate(contexts)])
    requests = [Instance("loglikelihood", {}, (c, g), i) for i, (c, g) in enumerate(zip(contexts, generated))
                if g.strip()]
    got, want = ours.loglikelihood(requests), oracle.loglikelihood(requests)
    assert_same_responses([(w,) for w in want], [(g,) for g in got])
    assert any(is_greedy for _, is_greedy in got)


def small_plan(cfg) -> PruningPlan:
    """A non-uniform plan by hand: per layer one expert removed, the others keep different dims."""
    rng = np.random.default_rng(0)
    experts, dims = {}, {}
    for layer in cfg.moe_layers:
        widths = cfg.expert_widths[layer]
        kept = tuple(e for e in range(len(widths)) if e != layer % len(widths))
        experts[layer] = kept
        dims[layer] = {e: tuple(sorted(rng.choice(widths[e], size=max(1, widths[e] - 2 - e % 3), replace=False)
                                       .tolist())) for e in kept}
    return PruningPlan("hand", "global", 0.3, {i: tuple(cfg.expert_widths[i]) for i in cfg.moe_layers}, experts, dims)


def requests_of(texts):
    return [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in enumerate(texts)]


PAIRS = [("The quick brown fox", " jumps over the lazy dog"), ("Experts route", " tokens"),
         ("what is two plus three?", " five"), ("", "A router picks the top two experts")]


def test_plan_masks_equal_the_compacted_model_and_trimming_changes_scores(tmp_path):
    path = checkpoint(tmp_path, "qwen2_moe")
    cfg, params = hf.load_pretrained(path, dtype="float32")
    plan = small_plan(cfg)
    plan.save(tmp_path / "plan.json")
    masked = MoeJaxLM.from_pretrained(path, plan=tmp_path / "plan.json", batch_size=2, max_length=MAX_LENGTH)
    cfg_c, params_c = pruning.apply(cfg, params, plan)
    assert len(set(cfg_c.expert_widths[cfg.moe_layers[0]])) > 1  # non-uniform widths
    compacted = MoeJaxLM(cfg_c, params_c, masked.tokenizer, batch_size=2, max_length=MAX_LENGTH)
    unpruned = MoeJaxLM(cfg, params, masked.tokenizer, batch_size=2, max_length=MAX_LENGTH)
    requests = requests_of(PAIRS)
    a, b, full = masked.loglikelihood(requests), compacted.loglikelihood(requests), unpruned.loglikelihood(requests)
    assert_same_responses([(x,) for x in a], [(y,) for y in b])
    assert max(abs(x[0] - y[0]) for x, y in zip(a, full)) > 1e-2  # the plan did change the model

    # A policy that keeps each token's top expert only changes every multi-token score; the identity
    # policy (tau 0, top-p 1) changes nothing. Both are checked against the unpruned routers.
    TrimmingPolicy.for_model(cfg, params, LayerTrim(max_active=1)).save(tmp_path / "top1.json")
    TrimmingPolicy.for_model(cfg, params, LayerTrim()).save(tmp_path / "identity.json")
    top1 = MoeJaxLM.from_pretrained(path, trimming=tmp_path / "top1.json", batch_size=2, max_length=MAX_LENGTH)
    same = MoeJaxLM.from_pretrained(path, trimming=tmp_path / "identity.json", batch_size=2, max_length=MAX_LENGTH)
    assert_same_responses([(x,) for x in full], [(y,) for y in same.loglikelihood(requests)], atol=1e-6)
    assert all(abs(x[0] - y[0]) > 1e-3 for x, y in zip(full, top1.loglikelihood(requests)))
    # Plan and policy compose (masks merged), and the policy refuses routers it was not calibrated on.
    both = MoeJaxLM.from_pretrained(path, plan=tmp_path / "plan.json", trimming=tmp_path / "top1.json",
                                    batch_size=2, max_length=MAX_LENGTH)
    assert both.loglikelihood(requests[:1])[0][0] != pytest.approx(a[0][0], abs=1e-3)


def test_bad_input_is_named(tmp_path):
    path = checkpoint(tmp_path, "qwen2_moe")
    lm = MoeJaxLM.from_pretrained(path, batch_size=2, max_length=MAX_LENGTH)
    other = tmp_path / "other"
    random_hf_checkpoint(other, "mixtral", vocab_size=128)
    cfg_other, _ = hf.load_pretrained(other, dtype="float32")
    small_plan(cfg_other).save(tmp_path / "other_plan.json")
    with pytest.raises(PlanError, match="expert widths"):
        MoeJaxLM.from_pretrained(path, plan=tmp_path / "other_plan.json")
    cfg_self, params_self = hf.load_pretrained(path, dtype="float32")
    cfg_m, params_m = hf.load_pretrained(other, dtype="float32")
    TrimmingPolicy.for_model(cfg_m, params_m, LayerTrim(max_active=1)).save(tmp_path / "other_policy.json")
    with pytest.raises(TrimmingError, match="calibrated for a mixtral model"):
        MoeJaxLM.from_pretrained(path, trimming=tmp_path / "other_policy.json")
    # Same shapes, other routers (the frozen-router rule): refused too.
    moved = jax.tree_util.tree_map(lambda x: x, params_self)
    layer = cfg_self.layer_name(cfg_self.moe_layers[0])
    moved[layer]["moe"]["router"]["kernel"] = moved[layer]["moe"]["router"]["kernel"] * 1.01
    TrimmingPolicy.for_model(cfg_self, moved, LayerTrim(max_active=1)).save(tmp_path / "drifted.json")
    with pytest.raises(RouterDriftError, match="router weights changed"):
        MoeJaxLM.from_pretrained(path, trimming=tmp_path / "drifted.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(PlanError, match="broken.json"):
        MoeJaxLM.from_pretrained(path, plan=tmp_path / "broken.json")
    # A tokenizer with more ids than the model's vocabulary.
    big = tmp_path / "big_tok"
    write_bpe_tokenizer(big, add_bos=False, vocab_size=200)
    with pytest.raises(HarnessError, match="ids but the model's vocabulary has 128"):
        MoeJaxLM.from_pretrained(path, tokenizer=str(big))
    # No room to generate: max_gen_toks >= max_length.
    request = Instance("generate_until", {}, ("Question: what", {"until": ["\n"], "max_gen_toks": MAX_LENGTH}), 0)
    with pytest.raises(HarnessError, match=f"max_gen_toks={MAX_LENGTH} leaves no room"):
        lm.generate_until([request])
    with pytest.raises(HarnessError, match="pretrained=<checkpoint directory> is required"):
        MoeJaxLM.create_from_arg_string("batch_size=2")
    assert json.loads((path / "config.json").read_text())  # nothing was written into the checkpoint
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]


def test_tasks_load_before_any_model_and_bad_ones_are_named(tmp_path):
    root = write_lm_eval_tasks(tmp_path / "tasks")
    manager = task_manager(root)
    assert sorted(load_tasks(["tiny_mc", "tiny_gsm"], manager)) == ["tiny_gsm", "tiny_mc"]
    with pytest.raises(HarnessError, match=r"unknown lm-eval task\(s\) \['tiny_mcq'\]"):
        load_tasks(["tiny_mcq"], manager)
    with pytest.raises(HarnessError, match="not a directory"):
        task_manager(tmp_path / "nowhere")
    (root / "mc.jsonl").unlink()
    with pytest.raises(HarnessError, match=r"task 'tiny_mc': cannot load its data \(dataset json, files .*mc.jsonl"):
        load_tasks(["tiny_mc"], manager)
    # A stock task whose dataset is not cached: offline, the error names it and says how to provide it.
    with pytest.raises(HarnessError, match=r"(?s)task 'arc_easy'.*allenai/ai2_arc.*HF_DATASETS_CACHE"):
        load_tasks(["arc_easy"], manager)


def launch(tmp_path, workdir, *flags, devices: int = 1, wait: bool = True):
    env = with_devices(dict(os.environ, PYTHONPATH=str(REPO)), devices)
    config = REPO / "configs" / "eval_harness.py"
    command = [sys.executable, "-m", "experiments.eval_harness", f"--config={config}", f"--workdir={workdir}",
               f"--config.model_path={tmp_path / 'mixtral'}", f"--config.include_path={tmp_path / 'tasks'}",
               f"--config.tasks={LM_EVAL_TASKS}", f"--config.max_length={MAX_LENGTH}", "--config.batch_size=4",
               *flags]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def samples(workdir, task):
    return [json.loads(line)["resps"] for line in (workdir / f"samples_{task}.jsonl").read_text().splitlines()]


def test_launcher_writes_results_resumes_and_two_processes_match_one_device(tmp_path):
    checkpoint(tmp_path, "mixtral")
    write_lm_eval_tasks(tmp_path / "tasks")
    first = launch(tmp_path, tmp_path / "one")
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert set(results["results"]) == set(LM_EVAL_TASKS) and results["n-shot"]["tiny_gsm"] == 2
    assert "|tiny_mc" in (tmp_path / "one" / "results.md").read_text()
    assert not list((tmp_path / "one").glob(".*tmp"))  # written atomically, nothing half-done left
    # Run again: every response comes from the request cache, and the outputs are the same.
    again = launch(tmp_path, tmp_path / "one")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Requests remaining: 0" in again.stderr and "Requests remaining: 1" not in again.stderr
    assert json.loads((tmp_path / "one" / "results.json").read_text())["results"] == results["results"]
    # Two processes of two CPU devices each, mesh data=2 x expert=2 across them: process 0 drives
    # lm-eval, process 1 follows its device calls; every request is answered as one device does.
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    procs = [launch(tmp_path, tmp_path / "mesh", "--mesh=data=2,expert=2", f"--coordinator_address=localhost:{port}",
                    "--num_processes=2", f"--process_id={i}", devices=2, wait=False) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    for task in LM_EVAL_TASKS:
        flat = lambda resps: [tuple(r[0]) if isinstance(r[0], list) else (r[0],) for rs in resps for r in rs]
        assert_same_responses(flat(samples(tmp_path / "one", task)), flat(samples(tmp_path / "mesh", task)))


def test_main_job_on_a_hf_checkpoint_reports_held_out_perplexity_and_lm_eval_scores(tmp_path, tasks):
    """experiments/prune.py on a tiny random Qwen2-MoE with its own BPE tokenizer: every row of the
    before/after table has held-out perplexity and the lm-eval columns, none a dash."""
    path = checkpoint(tmp_path, "qwen2_moe")
    text = lambda seed: "".join(json.dumps({"text": line}) + "\n" for line in np.random.default_rng(seed).permutation(
        ["The quick brown fox jumps over the lazy dog.", "Experts route tokens to the top two experts.",
         "What is two plus three? Five.", "A router picks the experts for each token."] * 6))
    (tmp_path / "calib.jsonl").write_text(text(0))
    (tmp_path / "heldout.jsonl").write_text(text(1))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "prune.py"), f"--config={REPO / 'configs' / 'prune.py'}",
         f"--workdir={tmp_path / 'work'}", f"--config.model_path={path}", "--config.methods=(('fisher:expert', 0.5),)",
         f"--config.calibration.data=json:{tmp_path / 'calib.jsonl'}", "--config.calibration.n_per_domain=4",
         f"--config.eval.data=json:{tmp_path / 'heldout.jsonl'}", "--config.eval.seq_len=32",
         "--config.eval.data_rows=4", "--config.eval.throughput=False", "--config.lm_eval.tasks=('tiny_mc',)",
         f"--config.lm_eval.include_path={tasks[0]}", "--config.lm_eval.max_length=32"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in (tmp_path / "work" / "comparison.md").read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert "ppl (eval.data)" in header and "tiny_mc acc" in header and "tiny_mc acc_norm" in header
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [r[0] for r in rows] == ["baseline", "fisher-expert@0.5"]
    assert not any(cell in ("–", "") for row in rows for cell in row), rows  # no column of dashes
    assert float(rows[0][header.index("ppl (eval.data)")]) != float(rows[1][header.index("ppl (eval.data)")])
    # The export carries the tokenizer and the generation config (its end ids) beside the weights.
    export = tmp_path / "work" / "pruned" / "fisher-expert@0.5"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (export / name).read_bytes() == (path / name).read_bytes(), name
