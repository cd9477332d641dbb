"""Requests per second of `MoeJaxLM` against lm-eval's own HF backend (HFLM), same checkpoint, same run.

    python -m experiments.bench_harness --model_path=checkpoints/skills_tiny

Each backend answers the same requests of each type (loglikelihood, loglikelihood_rolling,
generate_until), built from the stand-in tasks' text (`moe_jax.data.lm_eval_tasks`), called
directly so lm-eval's task and metric overhead is not timed. Every call is made `--repeats` times;
the first moe_jax call compiles, so the first and the best later time are both printed, with the
largest per-request loglikelihood difference and how many generated strings differ. Needs torch
and accelerate (HFLM).
"""

from __future__ import annotations

import os
import time

for _name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from moe_jax.data import lm_eval_tasks  # noqa: E402
from moe_jax.harness import MoeJaxLM  # noqa: E402

flags.DEFINE_string("model_path", "checkpoints/skills_tiny", "A Hugging Face checkpoint with its tokenizer.")
flags.DEFINE_integer("batch_size", 16, "Rows per batch, both backends.")
flags.DEFINE_integer("max_length", 128, "Context length, both backends.")
flags.DEFINE_integer("requests", 256, "Loglikelihood requests (a quarter as many rolling and generation ones).")
flags.DEFINE_integer("max_gen_toks", 16, "Tokens per generation.")
flags.DEFINE_integer("repeats", 3, "Calls per backend and request type; the first moe_jax one compiles.")
FLAGS = flags.FLAGS


def requests(n: int, seed: int = 0) -> dict[str, list[Instance]]:
    words = " ".join(lm_eval_tasks.TEXT).split()
    rng = np.random.default_rng(seed)

    def span(lo: int, hi: int) -> str:
        start = int(rng.integers(0, len(words) - hi))
        return " ".join(words[start:start + int(rng.integers(lo, hi))])

    gen_kwargs = {"until": ["\n\n", "Question:"], "max_gen_toks": FLAGS.max_gen_toks, "do_sample": False}
    return {
        "loglikelihood": [Instance("loglikelihood", {}, (span(2, 30), " " + span(1, 6)), i) for i in range(n)],
        "loglikelihood_rolling": [Instance("loglikelihood_rolling", {}, (span(20, 80),), i) for i in range(n // 4)],
        "generate_until": [Instance("generate_until", {}, (span(3, 20), gen_kwargs), i) for i in range(n // 4)],
    }


def main(argv: list[str]) -> None:
    del argv
    work = requests(FLAGS.requests)
    backends = {
        # logits_cache off: lm-eval 0.4.13's one-token-continuation cache gives rolling windows of
        # documents that share a prefix another document's score (docs/evaluation.md).
        "HFLM (torch)": HFLM(pretrained=FLAGS.model_path, device="cpu", dtype="float32", batch_size=FLAGS.batch_size,
                             max_length=FLAGS.max_length, logits_cache=False),
        "MoeJaxLM (jax)": MoeJaxLM.from_pretrained(FLAGS.model_path, batch_size=FLAGS.batch_size,
                                                   max_length=FLAGS.max_length),
    }
    rows, answers, best = [], {}, {}
    for name, lm in backends.items():
        for kind, reqs in work.items():
            seconds = []
            for _ in range(FLAGS.repeats):
                start = time.perf_counter()
                answers[name, kind] = getattr(lm, kind)(reqs, disable_tqdm=True)
                seconds.append(time.perf_counter() - start)
            best[name, kind] = min(seconds[1:]) if len(seconds) > 1 else seconds[0]
            rows.append(f"| {name} | {kind} | {len(reqs)} | {seconds[0]:.2f} | {best[name, kind]:.2f} | "
                        f"{len(reqs) / best[name, kind]:.1f} |")
    hf, ours = backends
    rows += [f"| moe_jax / HFLM speed | {kind} | | | | {best[hf, kind] / best[ours, kind]:.2f}x |" for kind in work]
    value = lambda a: a[0] if isinstance(a, tuple) else a
    gap = max(abs(value(a) - value(b)) for kind in ("loglikelihood", "loglikelihood_rolling")
              for a, b in zip(answers[hf, kind], answers[ours, kind], strict=True))
    differ = sum(a != b for a, b in zip(answers[hf, "generate_until"], answers[ours, "generate_until"], strict=True))
    print(f"\n{FLAGS.model_path}: batch {FLAGS.batch_size}, max_length {FLAGS.max_length}, "
          f"max_gen_toks {FLAGS.max_gen_toks}, {FLAGS.repeats} calls each\n")
    print("| backend | request type | requests | first call s | best later call s | requests/s |")
    print("|---|---|---:|---:|---:|---:|\n" + "\n".join(rows))
    print(f"\nlargest per-request loglikelihood difference: {gap:.2e}; generated strings that differ: {differ} of "
          f"{len(work['generate_until'])}")


if __name__ == "__main__":
    app.run(main)
