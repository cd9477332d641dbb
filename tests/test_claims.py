"""moe_jax.reproduction.claims: each claim's rule on hand-made reports where the answer is known."""

from __future__ import annotations

import pytest

from moe_jax.quality import PPL_COLUMN
from moe_jax.reproduction import claims

DOMAINS = ("arithmetic", "facts", "code", "language", "safety")


def row(mean_em: float, **per_domain: float) -> dict:
    return {**{d: {"em": per_domain.get(d, mean_em), "ppl": 1.0} for d in DOMAINS}, "mean_em": mean_em}


def fisher_report(fisher_em: float, magnitude_em: float, top4: dict[str, float]) -> dict:
    sweep = {f"{m}/{s}/0.5": row(v) for s in ("expert", "layer", "global")
             for m, v in (("fisher", fisher_em), ("activation", 0.3), ("router_weighted", 0.3),
                          ("magnitude", magnitude_em))}
    base = row(1.0)
    sensitivity = {"top4/fisher": row(0.8, **({d: 1.0 for d in DOMAINS} | top4)),
                   "top4/activation": row(1.0), "top4/random": row(1.0),
                   "top64/fisher": row(0.0, **{d: 0.0 for d in DOMAINS})}  # beyond a handful: ignored
    return {"baseline": base, "sweep": sweep, "sensitivity": sensitivity}


def pathfinder_report(global_em: float, uniform_em: float, reap_em: float) -> dict:
    results = {}
    for r in (0.25, 0.5):
        results |= {f"pathfinder/global/{r}": row(global_em), f"pathfinder/uniform/{r}": row(uniform_em),
                    f"reap/global/{r}": row(reap_em), f"frequency/uniform/{r}": row(0.1),
                    f"pathfinder[k_best,none,s=1]/global/{r}": row(1.0)}  # an ablation, not a baseline
    return {"results": results}


def test_fisher_rule_needs_fisher_above_every_baseline():
    assert claims.fisher_beats_baselines(fisher_report(0.5, 0.4, {}), "layer", 0.5)[1]
    text, holds = claims.fisher_beats_baselines(fisher_report(0.5, 0.6, {}), "layer", 0.5)
    assert not holds and "magnitude 0.600" in text
    assert claims.fisher_beats_baselines(fisher_report(0.5, 0.4, {}), "layer", 0.75) == ("not run", None)


@pytest.mark.parametrize("top4, holds", [
    ({"arithmetic": 0.2}, True),  # one skill collapses, the rest survive
    ({"arithmetic": 0.2, "facts": 0.5}, False),  # a second domain falls too: not one skill
    ({"arithmetic": 0.6}, False),  # a drop smaller than COLLAPSE
])
def test_handful_rule(top4, holds):
    text, result = claims.handful_carries_a_skill(fisher_report(0.5, 0.4, top4))
    assert result == holds
    if holds:
        assert text.startswith("top 4 Fisher dims: arithmetic 1.00 -> 0.20")


def test_pathfinder_rules_compare_with_the_right_rows():
    good = pathfinder_report(0.8, 0.5, 0.7)
    assert claims.global_beats_uniform(good, 0.5)[1] and claims.pathfinder_beats_local(good, 0.25)[1]
    text, holds = claims.pathfinder_beats_local(pathfinder_report(0.8, 0.5, 0.9), 0.5)
    assert not holds and "best baseline reap/global 0.900" in text
    assert not claims.global_beats_uniform(pathfinder_report(0.5, 0.6, 0.1), 0.25)[1]


def test_table_and_render_mark_agreement():
    pathfinder = pathfinder_report(0.8, 0.5, 0.7)
    testbeds = {"old": {"fisher": fisher_report(0.5, 0.6, {}), "pathfinder": pathfinder},
                "new": {"fisher": fisher_report(0.5, 0.4, {"code": 0.0}), "pathfinder": pathfinder}}
    rows = claims.table(testbeds)
    assert [r["claim"] for r in rows] == [c[0] for c in claims.CLAIMS]
    lines = claims.render(rows, ["old", "new"])
    assert lines[0] == "| claim | old | holds | new | holds | agree |"
    fisher_line = next(line for line in lines if line.startswith("| Fisher beats") and "(expert, 50%)" in line)
    cells = [c.strip() for c in fisher_line.strip("|").split("|")]
    assert (cells[2], cells[4], cells[5]) == ("no", "yes", "no")  # fails on old, holds on new: they disagree
    by_accuracy = [line for line in lines[2:] if "perplexity" not in line]
    assert all(line.endswith("| yes | yes |") for line in by_accuracy if "Pathfinder" in line or "allocation" in line)
    # No run measured perplexity: those claims are n/a on both, and so is their agreement.
    assert all(line.endswith("| not measured | n/a | n/a |") for line in lines[2:] if "perplexity" in line)


def test_perplexity_rules_read_the_quality_column():
    report = fisher_report(0.5, 0.4, {})
    for method, value in (("fisher", 4.0), ("activation", 4.2), ("router_weighted", 4.1), ("magnitude", 6.0)):
        report["sweep"][f"{method}/global/0.5"]["quality"] = {PPL_COLUMN: value}
    text, holds = claims.fisher_beats_baselines(report, "global", 0.5, by_ppl=True)
    assert holds and text.startswith("fisher 4.000; activation 4.200")
    report["sweep"]["router_weighted/global/0.5"]["quality"] = {PPL_COLUMN: 3.9}
    assert claims.fisher_beats_baselines(report, "global", 0.5, by_ppl=True)[1] is False
    path = pathfinder_report(0.8, 0.5, 0.7)
    path["results"]["pathfinder/global/0.25"]["quality"] = {PPL_COLUMN: 4.0}
    path["results"]["reap/global/0.25"]["quality"] = {PPL_COLUMN: 3.5}
    text, holds = claims.pathfinder_beats_local(path, 0.25, by_ppl=True)
    assert holds is False and "best baseline reap/global 3.500" in text
