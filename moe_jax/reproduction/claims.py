"""The seeds' claims as rules over the Fisher-MoE and Pathfinder launchers' reports, and their side-by-side table.

Each rule reads one report (experiments/fisher_moe.py's or experiments/pathfinder.py's report.json)
and returns (the numbers it compared, whether the claim holds). Accuracy is the mean held-out exact
match of the skills domains; perplexity, where the run measured it, is on held-out text
(`eval.data`), lower is better. `table` applies every rule to
several testbeds and `render` lays them out; experiments/testbed_claims.py writes the page.
"""

from __future__ import annotations

from collections.abc import Mapping

from moe_jax.quality import PPL_COLUMN

DIM_BASELINES = ("activation", "router_weighted", "magnitude")
EXPERT_BASELINES = ("frequency", "soft_count", "reap", "recon", "naee", "random_experts")
HANDFUL = 16  # "a handful of dims": at most this many removed
COLLAPSE = 0.5  # one domain loses at least this much exact match ...
SURVIVE = 0.9  # ... while the others keep at least this share of theirs


def em(row: dict) -> float:
    return row["mean_em"]


def perplexity(row: dict) -> float | None:
    """The row's held-out text perplexity (the launchers' quality column), or None if not measured."""
    value = row.get("quality", {}).get(PPL_COLUMN)
    return float(value) if isinstance(value, (int, float)) else None


def ppl(row: dict) -> str:
    value = perplexity(row)
    return "" if value is None else f", ppl {value:.2f}"


def score(row: dict, by_ppl: bool) -> float | None:
    """What a rule compares: mean exact match, or held-out perplexity (`by_ppl`, lower is better)."""
    return perplexity(row) if by_ppl else em(row)


def beats(a: dict, b: dict, by_ppl: bool) -> bool:
    return score(a, by_ppl) < score(b, by_ppl) if by_ppl else score(a, by_ppl) > score(b, by_ppl)


def shown(row: dict, by_ppl: bool) -> str:
    return f"{perplexity(row):.3f}" if by_ppl else f"{em(row):.3f}{ppl(row)}"


# Each rule: (the numbers it compared, whether the claim holds: True, False, or None when not measured).
def fisher_beats_baselines(fisher: dict, scope: str, ratio: float, by_ppl: bool = False) -> tuple[str, bool | None]:
    rows = {m: fisher["sweep"].get(f"{m}/{scope}/{ratio}") for m in ("fisher",) + DIM_BASELINES}
    if any(r is None for r in rows.values()):
        return "not run", None
    if any(score(r, by_ppl) is None for r in rows.values()):
        return "not measured", None
    text = "; ".join(f"{m} {shown(r, by_ppl)}" for m, r in rows.items())
    return text, all(beats(rows["fisher"], rows[m], by_ppl) for m in DIM_BASELINES)


def handful_carries_a_skill(fisher: dict) -> tuple[str, bool | None]:
    base = {d: v["em"] for d, v in fisher["baseline"].items() if isinstance(v, dict) and "em" in v}
    domains = list(base)
    for key, row in fisher["sensitivity"].items():
        k, ranking = key.split("/")
        k = int(k.removeprefix("top"))
        if ranking != "fisher" or k > HANDFUL:
            continue
        for d in domains:
            others = [o for o in domains if o != d]
            if (base[d] - row[d]["em"] >= COLLAPSE
                    and all(row[o]["em"] >= SURVIVE * base[o] for o in others)):
                alt = {r: fisher["sensitivity"].get(f"top{k}/{r}") for r in ("activation", "random")}
                alt_text = "; ".join(f"{r}: {d} {a[d]['em']:.2f}" for r, a in alt.items() if a)
                return (f"top {k} Fisher dims: {d} {base[d]:.2f} -> {row[d]['em']:.2f}, others keep >= "
                        f"{SURVIVE:.0%} ({alt_text})"), True
    worst = min(((int(key.split("/")[0][3:]), d, base[d] - row[d]["em"])
                 for key, row in fisher["sensitivity"].items() if key.endswith("/fisher")
                 and int(key.split("/")[0][3:]) <= HANDFUL for d in domains), key=lambda t: -t[2], default=None)
    return ("no domain collapses" + (f" (largest drop: {worst[1]} -{worst[2]:.2f} at top {worst[0]})" if worst
                                     else "")), False


def global_beats_uniform(path: dict, ratio: float) -> tuple[str, bool | None]:
    g, u = path["results"].get(f"pathfinder/global/{ratio}"), path["results"].get(f"pathfinder/uniform/{ratio}")
    if g is None or u is None:
        return "not run", None
    return f"global {em(g):.3f}{ppl(g)}; uniform {em(u):.3f}{ppl(u)}", em(g) > em(u)


def pathfinder_beats_local(path: dict, ratio: float, by_ppl: bool = False) -> tuple[str, bool | None]:
    runs = path["results"]
    p = runs.get(f"pathfinder/global/{ratio}")
    others = {"/".join(k.split("/")[:2]): r for k, r in runs.items()
              if k.split("/")[0] in EXPERT_BASELINES and k.endswith(f"/{ratio}")}
    if p is None or not others:
        return "not run", None
    others = {k: r for k, r in others.items() if score(r, by_ppl) is not None}
    if score(p, by_ppl) is None or not others:
        return "not measured", None
    best_name, best = (min if by_ppl else max)(others.items(), key=lambda kv: score(kv[1], by_ppl))
    return (f"pathfinder {shown(p, by_ppl)}; best baseline {best_name} {shown(best, by_ppl)}",
            beats(p, best, by_ppl))


CLAIMS = (
    [(f"Fisher beats activation, router-weighted and magnitude ({scope}, 50%)", "fisher",
      lambda f, s=scope: fisher_beats_baselines(f, s, 0.5)) for scope in ("expert", "layer", "global")]
    + [("Fisher beats activation, router-weighted and magnitude by held-out perplexity (global, 50%)", "fisher",
        lambda f: fisher_beats_baselines(f, "global", 0.5, by_ppl=True))]
    + [(f"a handful (<= {HANDFUL}) of dims carry one skill", "fisher", handful_carries_a_skill)]
    + [(f"global allocation beats uniform (Pathfinder, {r:.0%} of experts)", "pathfinder",
        lambda p, r=r: global_beats_uniform(p, r)) for r in (0.25, 0.5)]
    + [(f"Pathfinder beats local expert importance ({r:.0%} of experts)", "pathfinder",
        lambda p, r=r: pathfinder_beats_local(p, r)) for r in (0.25, 0.5)]
    + [(f"Pathfinder beats local expert importance by held-out perplexity ({r:.0%} of experts)", "pathfinder",
        lambda p, r=r: pathfinder_beats_local(p, r, by_ppl=True)) for r in (0.25, 0.5)]
)




def table(testbeds: Mapping[str, Mapping[str, dict]]) -> list[dict]:
    """[{claim, <testbed>: {numbers, holds}}] for `testbeds` = {name: {"fisher": report, "pathfinder": report}}."""
    return [{"claim": claim, **{name: dict(zip(("numbers", "holds"), rule(reports[stage])))
                                for name, reports in testbeds.items()}}
            for claim, stage, rule in CLAIMS]


def render(rows: list[dict], names: list[str]) -> list[str]:
    """The markdown table: per testbed its numbers and whether the claim holds, then whether the
    testbeds that measured it agree."""
    lines = ["| claim | " + " | ".join(f"{n} | holds" for n in names) + " | agree |",
             "|---|" + "---|---|" * len(names) + "---|"]
    word = {True: "yes", False: "no", None: "n/a"}
    for row in rows:
        measured = {row[n]["holds"] for n in names} - {None}
        cells = " | ".join(f"{row[n]['numbers']} | {word[row[n]['holds']]}" for n in names)
        agree = "n/a" if len(measured) == 0 else word[len(measured) == 1]
        lines.append(f"| {row['claim']} | {cells} | {agree} |")
    return lines
