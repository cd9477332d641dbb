"""The testbed model's report: its training curve, and held-out accuracy and perplexity beside the old model.

    python -m experiments.testbed_report --train_dir=/tmp/testbed/work --out=results/testbed

Reads what experiments/train.py wrote (TRAIN_DIR/metrics.jsonl; each model's train_summary.json)
and copies the metrics beside the report as the curve's source (without --train_dir the copy
already in OUT is used). Every --models entry is evaluated with the same settings: greedy exact
match and perplexity (full sequence and answers only) on --n_per_domain held-out prompts of each
skills domain, and perplexity on --prose_rows rows of held-out generic text (`prose:eval`).
Writes OUT/report.md, report.json and curve.png, each to a temporary name and renamed.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from moe_jax import evaluation, launch, reporting
from moe_jax.data import skills
from moe_jax.data.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("train_dir", None, "The testbed's training workdir (metrics.jsonl); default: OUT's copy.")
flags.DEFINE_string("out", "results/testbed", "Where report.md, report.json, curve.png and metrics.jsonl go.")
flags.DEFINE_list("models", ["testbed=checkpoints/testbed", "skills_tiny=checkpoints/skills_tiny"],
                  "name=checkpoint directory, the first being the model whose curve is shown.")
flags.DEFINE_integer("n_per_domain", 100, "Held-out prompts per skills domain.")
flags.DEFINE_integer("prose_rows", 64, "Rows of held-out generic text for its perplexity.")
flags.DEFINE_integer("seq_len", 128, "Row length of the generic-text perplexity (within every model's positions).")


def read_metrics(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        raise app.UsageError(f"{path}: not a metrics.jsonl written by experiments/train.py ({err})") from None


def curves(records: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """{panel: {line: (steps, values)}}: training and held-out CE, and held-out exact match."""
    ce, em = {}, {}
    for r in records:
        for key, value in r.items():
            if key == "ce" or key.startswith("eval_ce/"):
                xs, ys = ce.setdefault("train" if key == "ce" else key.split("/", 1)[1], ([], []))
            elif key.startswith("accuracy/") and key.split("/", 1)[1] in skills.DOMAINS:
                xs, ys = em.setdefault(key.split("/", 1)[1], ([], []))
            else:
                continue
            xs.append(r["step"])
            ys.append(value)
    return {"cross-entropy (nats/token)": ce, "held-out exact match": em}


def evaluate(path: Path) -> dict:
    cfg, params = evaluation.load_model(path)
    settings = evaluation.EvalSettings(n_per_domain=FLAGS.n_per_domain, data="prose:eval", data_rows=FLAGS.prose_rows,
                                       seq_len=FLAGS.seq_len, throughput=False)
    results = evaluation.evaluate(cfg, params, ByteTokenizer(), settings)
    summary = json.loads((path / "train_summary.json").read_text())
    m = summary.get("config", {}).get("model", {})
    return {
        "path": reporting.repo_relative(path.resolve(), REPO), "vocab_size": cfg.vocab_size,
        "params": summary.get("params"),
        "architecture": f"{m.get('num_layers')} layers, {m.get('num_experts')} routed experts x width "
                        f"{m.get('moe_intermediate_size')}, top-{m.get('num_experts_per_tok')}, shared "
                        f"{m.get('shared_expert_width')}",
        "loss": f"prompt tokens x {summary['config']['data']['prompt_weight']}, answers x 1, "
                f"{summary['config']['data'].get('prose_passages', 0)} prose passages",
        "train_seconds": summary.get("train_seconds"), "steps": summary.get("steps"),
        "tokens_per_s": summary.get("tokens_per_s"), "machine": summary.get("machine"),
        "exact_match": {d: results["exact_match"][d]["exact_match"] for d in skills.DOMAINS},
        "ppl_full": {d: results["perplexity"][d]["full"] for d in skills.DOMAINS},
        "ppl_answer": {d: results["perplexity"][d]["answer"] for d in skills.DOMAINS},
        "ppl_prose": results["perplexity"][reporting.TEXT_DOMAIN]["full"],
        "final_eval_ce": summary.get("final", {}),
    }


def render(models: dict[str, dict]) -> str:
    names = list(models)
    head = "| | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    cell = lambda v: f"{v:,}" if isinstance(v, int) else reporting.fmt(v, 1 if isinstance(v, float) and v > 10 else 3)
    row = lambda label, get: f"| {label} | " + " | ".join(cell(get(models[n])) for n in names) + " |\n"
    out = ["# The testbed model\n\n",
           "Built by `python -m experiments.testbed_report`: every number below was measured in one run, "
           "with the same evaluation settings for every model. The curve is the first model's training: "
           "`train` is its weighted training loss, each domain's line the held-out loss on that domain's "
           "answers (every token for prose); exact match on the held-out prompts.\n\n",
           "![training curve](curve.png)\n\n## Models\n\n", head]
    for key in ("path", "architecture", "loss", "params", "steps", "train_seconds", "tokens_per_s"):
        out.append(row(key.replace("_", " "), lambda m, k=key: m[k]))
    for name in names:
        machine = models[name].get("machine")
        if machine:
            out.append(f"\n{name} trained on {machine['platform']}, {machine['cpu_count']} CPUs, "
                       f"{machine['device_kind']} ({machine['backend']}).\n")
    out += [f"\n## Held-out exact match ({FLAGS.n_per_domain} prompts per domain, greedy)\n\n", head]
    out += [row(d, lambda m, d=d: m["exact_match"][d]) for d in skills.DOMAINS]
    out += [f"\n## Perplexity (vocabulary: {models[names[0]]['vocab_size']} byte ids)\n\n",
            "Full sequence: every token of `[BOS] prompt answer EOS`; answers: answer tokens and EOS; "
            f"prose: {FLAGS.prose_rows} rows of {FLAGS.seq_len} held-out generic-text tokens.\n\n", head]
    out += [row(f"{d} (full)", lambda m, d=d: m["ppl_full"][d]) for d in skills.DOMAINS]
    out += [row(f"{d} (answers)", lambda m, d=d: m["ppl_answer"][d]) for d in skills.DOMAINS]
    out.append(row("prose (held out)", lambda m: m["ppl_prose"]))
    return "".join(out)


def main(argv: list[str]) -> None:
    launch.start(argv)
    out = Path(FLAGS.out)
    metrics_copy = out / "metrics.jsonl"
    source = Path(FLAGS.train_dir) / "metrics.jsonl" if FLAGS.train_dir else metrics_copy
    records = read_metrics(source)
    if source != metrics_copy:
        reporting.atomic_write(metrics_copy, source.read_text())
    models = {}
    for entry in FLAGS.models:
        name, sep, path = entry.partition("=")
        if not sep or not (Path(path) / "config.json").is_file():
            raise app.UsageError(f"--models entry {entry!r}: expected name=<checkpoint directory with config.json>")
        models[name] = evaluate(Path(path))
    reporting.plot_lines(out / "curve.png", curves(records), "step", logx=False,
                         ylabel=["nats/token", "exact match"], logy=[True, False])
    reporting.atomic_write(out / "report.json", json.dumps(reporting.jsonable(models), indent=1, allow_nan=False))
    reporting.atomic_write(out / "report.md", render(models))
    print(render(models))


if __name__ == "__main__":
    app.run(main)
