"""Scores: the statistics of one calibration pass, per MoE layer, ready for `pruning.select`.

Per routed-expert intermediate dimension (layer l, expert e, dim j), arrays (E, F_max) with
NaN beyond each expert's real width:

  fisher           sum over calibration sequences of (dL_s/dm_{l,e,j})^2, L_s the mean token
                   loss of sequence s and m the dim's mask (empirical Fisher, Kwon et al. 2022)
  grad_abs         mean over sequences of |dL_s/dm| (the released Fisher-MoE scorer uses mean
                   |grad|; at one sequence per batch the two definitions coincide)
  activation       mean |h_j| over the (token, expert) pairs routed to e, h = silu(x Wg) * (x Wu)
  router_weighted  mean of g * |h_j| over the same pairs, g the token's combine weight
  magnitude        ||Wg[:, j]|| * ||Wu[:, j]|| * ||Wd[j, :]|| (data-free)
  random           uniform(0, 1), seeded

Per expert, arrays (E,) (the "routing" statistic): expert_count (routed valid tokens),
expert_prob_mass (sum of router scores over valid tokens), expert_reap (mean g * ||f_e(x)||
over routed tokens: REAP's saliency).

"trajectory" (see `trajectory.py`): expert_recon_routed (E,), seq_count / seq_prob_mass /
seq_strength / seq_recon_routed (S, E) per calibration sequence, transitions (E_l, E_next)
keyed by the earlier MoE layer, moe_input_sample (N, D). "recon_dense": expert_recon_dense (E,).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.model.layout import expert_weight
from moe_jax.reporting import atomic_write

DIM_STATISTICS = ("fisher", "grad_abs", "activation", "router_weighted", "magnitude", "random")
EXPERT_STATISTICS = ("expert_count", "expert_prob_mass", "expert_reap")
# What `collect` accepts: each dim statistic by name, "routing" for the per-expert ones,
# "trajectory" for Pathfinder's (per-sequence, transitions, routed reconstruction error, an
# input sample) and "recon_dense" for the reference code's every-expert reconstruction error.
STATISTICS = DIM_STATISTICS + ("routing", "trajectory", "recon_dense")


class ScoringError(ValueError):
    """Bad calibration input or statistics; the message names the layer, expert or file."""


@dataclasses.dataclass
class Scores:
    """Finished statistics: ``values[name][layer_name]`` -> (E, F_max) or (E,) float64."""

    values: dict[str, dict[str, np.ndarray]]
    widths: dict[str, tuple[int, ...]]  # layer_name -> expert widths the scores were taken at
    num_sequences: int
    num_tokens: int
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> dict[str, np.ndarray]:
        if name not in self.values:
            raise KeyError(f"statistic {name!r} was not collected; have {sorted(self.values)}")
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    def check_finite(self) -> None:
        """NaN or inf inside a real dimension is an error naming the statistic, layer and expert."""
        for name, per_layer in self.values.items():
            for layer, arr in per_layer.items():
                if name not in DIM_STATISTICS and name not in EXPERT_STATISTICS and not name.startswith("expert_"):
                    if not np.all(np.isfinite(arr)):
                        raise ScoringError(f"statistic {name!r}, {layer}: non-finite values; the calibration "
                                           "pass diverged (check the model's dtype and the calibration data)")
                    continue
                for e, width in enumerate(self.widths[layer]):
                    row = arr[e, :width] if arr.ndim == 2 else arr[e:e + 1]
                    if not np.all(np.isfinite(row)):
                        bad = int(np.flatnonzero(~np.isfinite(row))[0])
                        raise ScoringError(f"statistic {name!r}, {layer} expert {e}: non-finite value "
                                           f"{row[bad]} at dim {bad}; the calibration pass diverged "
                                           "(check the model's dtype and the calibration data)")

    def check_model(self, cfg: ModelConfig) -> None:
        """The scores must describe this model's MoE layers and widths."""
        want = {cfg.layer_name(i): tuple(cfg.expert_widths[i]) for i in cfg.moe_layers}
        if want != self.widths:
            diff = sorted(set(want.items()) ^ set(self.widths.items()))[:2]
            raise ScoringError(f"scores were collected on another model: expert widths differ ({diff} ...); "
                               "collect the scores on the model being pruned")

    # ---------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz atomically (temporary name, then rename)."""
        arrays = {f"{name}/{layer}": arr for name, per in self.values.items() for layer, arr in per.items()}
        header = {"widths": {k: list(v) for k, v in self.widths.items()}, "num_sequences": self.num_sequences,
                  "num_tokens": self.num_tokens, "meta": self.meta}
        arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        path = Path(path)
        try:
            with np.load(path) as z:
                header = json.loads(bytes(z["__header__"]).decode())
                values: dict[str, dict[str, np.ndarray]] = {}
                for key in z.files:
                    if key != "__header__":
                        name, layer = key.split("/", 1)
                        values.setdefault(name, {})[layer] = z[key]
        except (OSError, ValueError, KeyError) as err:
            raise ScoringError(f"{path}: not a scores file written by Scores.save ({err})") from err
        return cls(values, {k: tuple(v) for k, v in header["widths"].items()}, header["num_sequences"],
                   header["num_tokens"], header.get("meta", {}))


def padded(cfg: ModelConfig, layer: int, per_expert: list[np.ndarray]) -> np.ndarray:
    """(E, F_max) float64 from per-expert vectors of their own widths, NaN beyond each width."""
    out = np.full((cfg.experts_per_layer[layer], cfg.max_width(layer)), np.nan)
    for e, v in enumerate(per_expert):
        out[e, :len(v)] = v
    return out


def magnitude(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """||gate column|| * ||up column|| * ||down row|| of every dim: the data-free baseline."""
    out = {}
    for layer in cfg.moe_layers:
        per = []
        for e in range(cfg.experts_per_layer[layer]):
            w = {k: np.asarray(v, np.float64) for k, v in expert_weight(cfg, params, layer, e).items()}
            per.append(np.linalg.norm(w["gate"], axis=0) * np.linalg.norm(w["up"], axis=0)
                       * np.linalg.norm(w["down"], axis=1))
        out[cfg.layer_name(layer)] = padded(cfg, layer, per)
    return out


def random_scores(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 2718])
    out = {}
    for layer in cfg.moe_layers:
        per = [rng.uniform(size=w) for w in cfg.expert_widths[layer]]
        out[cfg.layer_name(layer)] = padded(cfg, layer, per)
    return out
