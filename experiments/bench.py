"""Benchmarks: routed-expert dispatch against a dense matmul (--mode=dispatch), or a whole
Qwen1.5-MoE-A2.7B-shaped model compressed four ways (--mode=e2e).

dispatch (moe_jax/bench/dispatch.py): for one MoE layer shape, routes random tokens once,
then times each dispatch path and a dense matmul with exactly the layer's useful FLOPs in the
same run; prints tokens/s, useful FLOP/s and the ratio to the matmul, for the forward pass and,
with --passes=forward,backward, forward+backward too (gradients in weights and x, against three
matmuls). Paths whose estimated time exceeds --budget_s are reported as skipped rather than run.

    python -m experiments.bench                  # from the repo root: both layers, float32, ~3 min
    python -m experiments.bench --layer=mixtral_small --impls=blocked --block_rows=128 --repeats=5
    python -m experiments.bench --dtype=bfloat16 --impls=dense,ragged,blocked,pallas --tokens=2048,8192 \
        --passes=forward,backward                # a GPU (experiments/gpu/issue22.sh)

e2e (moe_jax/bench/e2e.py): random bf16 weights, prefill/decode tokens/s, weight bytes and
device memory of unpruned / Fisher-MoE 50% (expert, global) / Pathfinder 50% / trimmed, the
MoE layer's FLOP/s against a dense matmul, and Fisher scoring time for N x L tokens; writes
WORKDIR/report.md and report.json. The size flags shrink the model for a CPU:

    python -m experiments.bench --mode=e2e --workdir=/tmp/bench_e2e                      # full size (GPU)
    python -m experiments.bench --mode=e2e --workdir=/tmp/e2e_cpu --num_layers=2 --hidden_size=256 \
        --num_experts=16 --expert_width=128 --shared_width=512 --vocab_size=2048 --num_heads=4 \
        --batch_size=4 --prompt_len=64 --new_tokens=16 --calib_sequences=16 --calib_len=128 --traj_sequences=8
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import jax
from absl import app, flags

from moe_jax import reporting
from moe_jax.bench import dispatch as bench_dispatch
from moe_jax.bench import e2e as bench_e2e
from moe_jax.model import moe

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "dispatch", ["dispatch", "e2e"], "One MoE layer's dispatch paths, or the whole model.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Weight dtype (default: float32 dispatch, bfloat16 e2e).")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median reported).")
flags.DEFINE_integer("seed", 0, "Seed for weights, tokens and router.")
# --mode=dispatch
flags.DEFINE_enum("layer", "all", ["mixtral_small", "qwen15", "all"], "Which MoE layer shape to benchmark.")
flags.DEFINE_list("tokens", ["0"], "Tokens per call, one table each; 0 means the layer's default (4096 / 2048).")
flags.DEFINE_list("passes", ["forward"], "forward and/or backward (forward+backward: gradients in weights and x).")
flags.DEFINE_list("impls", ["dense", "ragged", "blocked"], "Dispatch paths to time.")
flags.DEFINE_integer("block_rows", 0, "Rows per block of blocked (per tile of pallas, megablox); 0 means the default.")
flags.DEFINE_float("budget_s", 25.0, "Skip a path whose estimated single call takes longer than this.")
# --mode=e2e: model size (0 = Qwen1.5-MoE-A2.7B's) and workload
flags.DEFINE_string("workdir", None, "e2e: where report.md and report.json go.")
for _name in ("num_layers", "hidden_size", "num_heads", "num_experts", "expert_width", "shared_width", "vocab_size"):
    flags.DEFINE_integer(_name, 0, f"e2e: {_name} of the model; 0 keeps Qwen1.5-MoE-A2.7B's.")
_DEFAULTS = bench_e2e.E2ESettings()
flags.DEFINE_string("impl", _DEFAULTS.impl, "e2e: the MoE dispatch path of prefill, decode and Fisher scoring.")
flags.DEFINE_bool("program_bytes", _DEFAULTS.program_bytes, "e2e: also compile each variant's generate for XLA's "
                  "memory analysis (one more compile per variant).")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "e2e: prompts per generate call.")
flags.DEFINE_integer("prompt_len", _DEFAULTS.prompt_len, "e2e: prompt tokens.")
flags.DEFINE_integer("new_tokens", _DEFAULTS.new_tokens, "e2e: generated tokens (decode speed).")
flags.DEFINE_integer("rounds", _DEFAULTS.rounds, "e2e: passes over all variants (median); > 1 keeps every "
                     "compressed copy in memory at once.")
flags.DEFINE_integer("calib_sequences", _DEFAULTS.calib_sequences, "e2e: Fisher calibration sequences (N).")
flags.DEFINE_integer("calib_len", _DEFAULTS.calib_len, "e2e: tokens per calibration sequence (L).")
flags.DEFINE_integer("micro_batch_size", _DEFAULTS.micro_batch_size, "e2e: rows per scoring step.")
flags.DEFINE_enum("scorer", _DEFAULTS.scorer, list(bench_e2e.SCORERS), "e2e: which Fisher scorer(s) to time.")
flags.DEFINE_integer("traj_sequences", _DEFAULTS.traj_sequences, "e2e: calibration sequences for Pathfinder.")
flags.DEFINE_float("ratio", _DEFAULTS.ratio, "e2e: fraction of dims / experts pruned.")
flags.DEFINE_float("trim_target", _DEFAULTS.trim_target, "e2e: active routed-parameter fraction of trimming.")
flags.DEFINE_list("variants", list(bench_e2e.VARIANTS), "e2e: compressed variants measured beside the unpruned.")
flags.DEFINE_integer("trim_bisect_steps", _DEFAULTS.trim_bisect_steps, "e2e: bisection steps of trimming's tau.")


def dispatch_main() -> None:
    unknown = sorted(set(FLAGS.impls) - set(moe.IMPLS))
    if unknown:
        raise app.UsageError(f"--impls: unknown path(s) {unknown}; expected some of {moe.IMPLS}")
    if not FLAGS.passes or set(FLAGS.passes) - {"forward", "backward"}:
        raise app.UsageError(f"--passes={','.join(FLAGS.passes)}: expected forward and/or backward")
    try:
        token_counts = [int(t) for t in FLAGS.tokens]
    except ValueError:
        raise app.UsageError(f"--tokens={','.join(FLAGS.tokens)}: expected integers") from None
    dtype = FLAGS.dtype or "float32"
    names = list(bench_dispatch.LAYERS) if FLAGS.layer == "all" else [FLAGS.layer]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores); median of "
          f"{FLAGS.repeats} interleaved calls after warm-up; block_rows={FLAGS.block_rows or 'default'}")
    for name in names:
        for tokens in token_counts:
            shape = bench_dispatch.LAYERS[name]
            if tokens:
                shape = bench_dispatch.LayerShape(shape.experts, shape.top_k, shape.hidden, shape.width, tokens)
            for backward in [p == "backward" for p in FLAGS.passes]:
                result = bench_dispatch.measure_layer(shape, dtype=dtype, impls=FLAGS.impls, repeats=FLAGS.repeats,
                                                      block_rows=FLAGS.block_rows or None, budget_s=FLAGS.budget_s,
                                                      seed=FLAGS.seed, backward=backward)
                print("\n".join(bench_dispatch.layer_rows(name, shape, result, dtype, FLAGS.impls)), flush=True)


def e2e_main() -> None:
    if not FLAGS.workdir:
        raise app.UsageError("--mode=e2e needs --workdir (report.md and report.json are written there)")
    fields = {f: getattr(FLAGS, f) for f in bench_e2e.E2ESettings.__dataclass_fields__ if f in FLAGS}
    settings = bench_e2e.E2ESettings(**{**fields, "dtype": FLAGS.dtype or "bfloat16",
                                        "variants": tuple(FLAGS.variants)})
    try:
        settings.check()
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    report = bench_e2e.run(settings)
    command = "python -m experiments.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    workdir = Path(FLAGS.workdir)
    reporting.atomic_write(workdir / "report.json", json.dumps({**report, "command": command}, indent=1))
    text = bench_e2e.markdown(report, command)
    reporting.atomic_write(workdir / "report.md", text)
    print(text)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    dispatch_main() if FLAGS.mode == "dispatch" else e2e_main()


if __name__ == "__main__":
    app.run(main)
