"""The seeds' claims, checked on two testbeds side by side from the Fisher-MoE and Pathfinder launchers' reports.

    python -m experiments.testbed_claims \\
        --testbed=old=results/testbed/skills_tiny --testbed=new=results/reproduce \\
        --out=results/testbed/claims.md

Each --testbed is name=DIR with DIR/fisher_moe/report.json and DIR/pathfinder/report.json (what
experiments/fisher_moe.py and experiments/pathfinder.py write). Every claim is a rule over those
numbers (`moe_jax.reproduction.claims`); the table shows each testbed's numbers and whether the
claim holds, and a .json twin beside it holds the same.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from moe_jax import reporting
from moe_jax.reproduction import claims

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("testbed", None, "name=DIR holding fisher_moe/report.json and pathfinder/report.json.")
flags.DEFINE_string("out", "results/testbed/claims.md", "The claims table (markdown; a .json twin beside it).")
flags.mark_flags_as_required(["testbed"])


def load(spec: str) -> tuple[str, dict[str, dict]]:
    name, sep, root = spec.partition("=")
    if not sep:
        raise app.UsageError(f"--testbed {spec!r}: expected name=DIR")
    reports = {}
    for stage in ("fisher_moe", "pathfinder"):
        path = Path(root) / stage / "report.json"
        try:
            reports[stage.split("_")[0]] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise app.UsageError(f"--testbed {spec!r}: cannot read {path}: {err}") from None
    return name, reports


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    testbeds = dict(load(spec) for spec in FLAGS.testbed)
    names = list(testbeds)
    rows = claims.table(testbeds)
    lines = claims.render(rows, names)
    sources = ", ".join(f"{n} = `{spec.partition('=')[2]}`" for n, spec in zip(names, FLAGS.testbed))
    page = ["# The seeds' claims on two testbeds\n",
            f"Built by `python -m experiments.testbed_claims` from the Fisher-MoE and Pathfinder reports of "
            f"{sources}. Numbers: mean held-out exact match over the five skills domains (and held-out "
            f"perplexity where the run measured it); `holds` applies the claim's rule to them "
            f"(`moe_jax.reproduction.claims`).\n", "## Claims\n", *lines]
    out = Path(FLAGS.out)
    reporting.atomic_write(out, "\n".join(page) + "\n")
    reporting.atomic_write(out.with_suffix(".json"), json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
