"""Tables, JSON and plots of evaluation results, written atomically.

`format_table` renders one `evaluation.evaluate` dict, `comparison_table` lines several runs
up (baseline, then each pruning method), `write_results` writes results.json, results.md and
expert_load.png into a workdir (temporary name, then rename: never half a file).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


TEXT_DOMAIN = "text"  # perplexity of a `load_texts` corpus (`eval.data`) is reported under this domain name


def run_label(method: str, scope: str, ratio: float) -> str:
    """The name of one pruning run in tables and file names: "fisher-global@0.5"."""
    return f"{method}-{scope}@{ratio:g}"


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: the number with `digits` decimals, or "–" for None / NaN / inf."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _load_imbalance(fraction: Mapping[str, Sequence[float]]) -> float | None:
    """Mean over MoE layers of max_e load * E: 1.0 is perfectly balanced, E is one expert only."""
    ratios = [max(f) * len(f) for f in fraction.values() if len(f)]
    return sum(ratios) / len(ratios) if ratios else None


def format_table(results: Mapping[str, Any]) -> str:
    """A markdown per-domain table (exact match, safety rates, perplexities, load) plus size and speed."""
    em, ppl, load = (results.get(k, {}) for k in ("exact_match", "perplexity", "expert_load"))
    lines = ["| domain | n | exact match | refusal | over-refusal | ppl (answer) | ppl (full) | max load×E |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for domain in dict.fromkeys([*em, *ppl]):
        e, p = em.get(domain, {}), ppl.get(domain, {})
        imbalance = _load_imbalance(load[domain]["fraction"]) if domain in load else None
        lines.append(f"| {domain} | {e.get('n', '–')} | {fmt(e.get('exact_match'))} | "
                     f"{fmt(e.get('refusal_rate'))} | {fmt(e.get('over_refusal_rate'))} | "
                     f"{fmt(p.get('answer'), 2)} | {fmt(p.get('full'), 2)} | {fmt(imbalance, 2)} |")
    if em:
        mean = sum(e["exact_match"] for e in em.values()) / len(em)
        lines.append(f"| **mean** | {sum(e['n'] for e in em.values())} | {fmt(mean)} | | | | | |")
    size = results.get("model", {})
    if size:
        lines += ["", f"params: total {size['total']:,} · routed experts {size['routed_experts']:,} · "
                      f"active/token {size['active_per_token']:,} · {size['bytes'] / 2**20:.2f} MiB"]
    speed = results.get("throughput")
    if speed:
        lines.append(f"throughput (batch {speed['batch_size']}, prompt {speed['prompt_len']}): prefill "
                     f"{fmt(speed['prefill_tokens_per_s'], 0)} tok/s · decode "
                     f"{fmt(speed['decode_tokens_per_s'], 0)} tok/s · peak memory "
                     f"{speed['memory']['peak_bytes'] / 2**20:.0f} MiB ({speed['memory']['source']})")
    if load:
        lines.append("max load×E: the busiest expert's share of routed slots × expert count, averaged over "
                     "MoE layers (1 = perfectly balanced)")
    lines += [f"skipped: {s}" for s in results.get("skipped", [])]
    return "\n".join(lines)


def comparison_table(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """One row per run (baseline first, then each method): exact match per domain, safety, held-out
    perplexity on `eval.data` text and lm-eval scores (when any run has them), size."""
    if not runs:
        raise ValueError("comparison_table: no runs to compare")
    domains = list(dict.fromkeys(d for _, r in runs for d in r.get("exact_match", {})))
    held_out = any(TEXT_DOMAIN in r.get("perplexity", {}) for _, r in runs)
    lm_eval = list(dict.fromkeys(k for _, r in runs for k in r.get("lm_eval", {})))
    skills = ["mean EM", "refusal", "over-refusal"] if domains else []  # the built-in tokenizer's columns
    header = ["model", *domains, *skills, *(["ppl (eval.data)"] if held_out else []), *lm_eval, "active params",
              "MiB"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, r in runs:
        em, size = r.get("exact_match", {}), r.get("model", {})
        scores = [em[d]["exact_match"] if d in em else None for d in domains]
        known = [s for s in scores if s is not None]
        safety = em.get("safety", {})
        ppl = [fmt(r.get("perplexity", {}).get(TEXT_DOMAIN, {}).get("full"), 2)] if held_out else []
        skill_cells = [fmt(sum(known) / len(known) if known else None), fmt(safety.get("refusal_rate")),
                       fmt(safety.get("over_refusal_rate"))] if domains else []
        cells = [label, *map(fmt, scores), *skill_cells, *ppl,
                 *(fmt(r.get("lm_eval", {}).get(k)) for k in lm_eval),
                 f"{size['active_per_token']:,}" if size else "–",
                 f"{size['bytes'] / 2**20:.2f}" if size else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """Plain JSON types; NaN/inf become null (JSON has no spelling for them)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def repo_relative(path: Path, repo: Path) -> str:
    """`path` relative to the repository when it lies inside it, so that commands, reports and
    records hold no machine paths; else as given."""
    path = Path(path)
    return str(path.relative_to(repo)) if path.is_relative_to(repo) else str(path)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (never half-written).
    Missing parent directories are created."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OSError(f"cannot write {path.name} into {str(path.parent)!r}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the permissions open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_results(results: Mapping[str, Any], workdir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, results.md and (with expert load) expert_load.png into `workdir`, atomically.

    Everything is rendered before anything is written, so a failure leaves earlier files as
    they were. Returns {kind: path}.
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"write_results: results must be a mapping, got {type(results).__name__}")
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the results directory {str(workdir)!r}: {err.strerror or err}") from err
    as_json = json.dumps(jsonable(results), indent=2, allow_nan=False) + "\n"
    source = f"Model: {results['model_path']}\n\n" if results.get("model_path") else ""
    as_markdown = f"# Evaluation results\n\n{source}{format_table(results)}\n"
    png = render_expert_load(results["expert_load"]) if results.get("expert_load") else None
    paths = {"json": atomic_write(workdir / "results.json", as_json),
             "markdown": atomic_write(workdir / "results.md", as_markdown)}
    if png is not None:
        paths["expert_load"] = atomic_write(workdir / "expert_load.png", png)
    return paths


def render_expert_load(load: Mapping[str, Mapping[str, Any]]) -> bytes:
    """PNG heatmap, one panel per domain: MoE layers (rows) × experts (columns), colour = load fraction.

    Layers with fewer experts (after pruning) leave their extra columns blank. Uses the Agg
    canvas directly, so it never changes the caller's matplotlib backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not load:
        raise ValueError("render_expert_load: no domains to draw")
    grids = {}
    for domain, entry in load.items():
        fractions = list(entry["fraction"].values())
        grid = np.full((len(fractions), max((len(f) for f in fractions), default=1)), np.nan)
        for row, f in enumerate(fractions):
            grid[row, :len(f)] = f
        grids[domain] = (list(entry["fraction"]), grid)
    vmax = max(float(np.nanmax(g)) if np.isfinite(g).any() else 0.0 for _, g in grids.values()) or 1.0
    fig = Figure(figsize=(3.2 * len(grids) + 1, 0.35 * max(len(n) for n, _ in grids.values()) + 2.2),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    image = None
    for ax, (domain, (names, grid)) in zip(axes, grids.items()):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(domain)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(names)), [n.removeprefix("layer_") for n in names])
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(image, ax=list(axes), label="fraction of routed slots")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plot_expert_load(load: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write `render_expert_load(load)` to `path` atomically."""
    return atomic_write(path, render_expert_load(load))


class ResumableRuns:
    """Finished evaluations of a study as one JSON file, rewritten atomically after each: a killed
    study started again with the same fingerprint skips what it has."""

    def __init__(self, path: Path, fingerprint: dict):
        fingerprint = json.loads(json.dumps(jsonable(fingerprint)))  # tuples -> lists, as read back
        self.path, self.data = path, {"fingerprint": fingerprint, "runs": {}}
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("fingerprint") == fingerprint:
                self.data = old
            else:
                log.warning("%s belongs to other settings; starting over", path)

    def get(self, key: str):
        return self.data["runs"].get(key)

    def put(self, key: str, value) -> None:
        self.data["runs"][key] = value
        atomic_write(self.path, json.dumps(jsonable(self.data)))


def plot_lines(path: Path, panels: dict[str, dict[str, tuple[list, list]]], xlabel: str, logx: bool,
               ylabel: str | Sequence[str] = "exact match", logy: bool | Sequence[bool] = False) -> None:
    """One panel per entry of `panels` ({title: {line name: (xs, ys)}}), written atomically.

    y spans [0, 1] (exact match) unless `logy` (then a log scale fit to the data); `ylabel` and
    `logy` are one value for every panel or one per panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.4 * len(panels), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    log_y = [logy] * len(panels) if isinstance(logy, bool) else list(logy)
    for ax, (title, lines), log_scale in zip(axes, panels.items(), log_y):
        for name, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if log_scale:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.02, 1.02)
        if logx:
            ax.set_xscale("log", base=2)
    labels = [ylabel] if isinstance(ylabel, str) else list(ylabel)
    for ax, label in zip(axes, labels):
        ax.set_ylabel(label, fontsize=8)
    last_lines = list(panels.values())[-1].keys()
    for ax, lines in zip(axes, panels.values()):  # the last panel's legend, and any panel with other lines
        if ax is axes[-1] or lines.keys() != last_lines:
            ax.legend(fontsize=7)
    fig.savefig(str(path.with_suffix(".tmp.png")), dpi=110)
    path.with_suffix(".tmp.png").replace(path)
