"""Every table of the README in one run: experiments/reproduce.py.

What it runs, each launcher as a stage in WORKDIR/<stage>/ on the committed built-in model
checkpoints/testbed (trained first into WORKDIR/train/ with configs/testbed.py if it is missing
or `train` is set; --config.checkpoint=checkpoints/skills_tiny for the earlier model): prune
(the main job's before/after table, exports), fisher_moe (configs/fisher_moe_repro.py),
pathfinder, trimming (the dense / standard / trimmed / pruned trade-off), trim_latency (cpu
preset), audit (the safety table) and bench_dispatch (experiments/bench.py, both layers). Then
WORKDIR/RESULTS.md (every table, figures linked) and WORKDIR/results.json (every number,
versions, machine). A stage whose outputs exist, parse and match its fingerprint is skipped, so
a killed reproduction resumes; the launchers' own progress files resume a stage killed half-way.

    python experiments/reproduce.py --config=configs/reproduce.py --workdir=/tmp/reproduce
    python experiments/reproduce.py --config=configs/reproduce.py --workdir=/tmp/repro_ci --config.quick=True

How long: about 46 minutes on the 2-core dev CPU (each stage's seconds are in the committed
results/reproduce/RESULTS.md), plus what configs/testbed.py says if it trains; `quick` (every stage at smoke size,
every table still filled) about 4. Result: results/reproduce/RESULTS.md.
"""

from __future__ import annotations

import ml_collections

STAGE_ORDER = ("prune", "fisher_moe", "pathfinder", "trimming", "trim_latency", "audit", "bench_dispatch")


def _quick() -> dict:
    """Per-stage overrides of the launchers' configs (or flags, for bench) in quick mode."""
    calib = dict(max_rows=12)  # prose rows of 64 tokens
    text = dict(data_rows=4)  # held-out perplexity on 4 rows
    return dict(
        train=dict(steps=50),
        prune=dict(methods=(("fisher:expert", 0.5), ("fisher:global", 0.5), ("pathfinder:global", 0.25)),
                   eval=dict(n_per_domain=3, throughput=False, **text), calibration=dict(max_rows=16)),
        fisher_moe=dict(n_per_domain=3, calibration=calib, eval=text, methods=("fisher", "random"), scopes=("global",),
                        ratios=(0.5,), sensitivity_rankings=("fisher",), sensitivity_ks=(1, 4), repeats=3,
                        # 128 new tokens: as in trim_latency below, 32 on the 14k-param expert-heavy model
                        # timed decode at <= 0 once on the loaded box (an empty throughput cell).
                        throughput_batch=2, prompt_len=8, new_tokens=128, throughput_this_model=False,
                        heavy=dict(hidden_size=32, width=16, num_experts=4, vocab_size=64, num_heads=2,
                                   num_layers=1)),
        pathfinder=dict(n_per_domain=3, calibration=calib, eval=text, ratios=(0.25, 0.5), repeats=1,
                        methods=(("pathfinder", "global"), ("naee", "uniform"), ("naee", "global")),
                        selection_ablations=(("k_best", "none", 1.0),),
                        qwen_layer=dict(hidden_size=32, num_experts=6, width=16, tokens=8)),
        trimming=dict(n_per_domain=3, calibration=dict(max_rows=12, batch_size=4), eval=text, targets=(0.65,),
                      pruned_rows=False, modes=("global",), sweep_taus=(0.5,), telemetry_batches=3,
                      # 32 new tokens, median of 3: like trim_latency below, one 16-token call on the loaded
                      # box can time decode at <= 0 (an empty cell in the trade-off table).
                      latency=dict(repeats=3, rounds=1, new_tokens=32, prompt_len=16)),
        # 128 new tokens: with 16, decode time (generate(16) - generate(1)) was within the noise of a
        # loaded 2-core CI box and came out <= 0 once (no decode latency, an empty cell).
        trim_latency=dict(hidden_size=32, num_layers=1, num_heads=2, num_experts=8, width=16, vocab_size=64,
                          batch_sizes=(2,), prompt_len=8, new_tokens=128, repeats=3, rounds=1),
        # One row, the trimmed model the trade-off table joins (the pruned rows' safety-aware selection is
        # tested in tests/test_safety.py and notebook 03); the unpruned row is recomputed whenever the audit
        # resumes (its GCG suffix feeds transfer).
        audit=dict(n_safety=8, n_utility=2, n_attack=2, rows=("trimmed",),
                   attacks=dict(max_queries=100, gcg_steps=2, gcg_candidates=4, reach_prompts=2),
                   calibration=dict(max_rows=16), safety_calibration=dict(n_per_domain=8),
                   monitor=dict(n_per_domain=3),
                   # trimming's quick calibration, so the trade-off table can join its trimmed row
                   trim_calibration=dict(max_rows=12, batch_size=4),
                   # held-out perplexity as a quality column of every row (moe_jax.quality)
                   eval=dict(data_rows=4, seq_len=64)),
        bench_dispatch=dict(layer="mixtral_small", tokens=64, repeats=1),
    )


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.quick = False  # True: every stage at smoke size (`quick_overrides`), for CI
    config.checkpoint = "checkpoints/testbed"  # the committed built-in model, relative to the repository
    config.train = False  # True: train the model (configs/testbed.py) even though the checkpoint exists
    config.stages = STAGE_ORDER
    config.rerun = ()  # stage names to run again even if their outputs are valid
    config.jobs = 1  # stages at once; > 1 only where timings do not matter (CI: quick with jobs=2 on 2 cores)
    config.keep_going = True  # a failed stage does not stop the others (the run still exits non-zero)
    config.compilation_cache = True  # WORKDIR/.jax_cache shared by the stages (unless JAX_COMPILATION_CACHE_DIR is set)
    # Launcher config overrides per stage ({key: value}, nested as in the launcher's config; for
    # bench_dispatch, its flags). `overrides` applies in full runs, `quick_overrides` with quick.
    config.overrides = ml_collections.ConfigDict({name: {} for name in ("train", *STAGE_ORDER)})
    config.quick_overrides = ml_collections.ConfigDict(_quick())
    return config
