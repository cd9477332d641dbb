"""PruningPlan: which experts and which of their intermediate dims stay, as plain data.

A plan names the model it was made for (per MoE layer: expert count and widths), so it can
refuse another model. `masks` turns it into `model.forward` masks (simulation); `apply`
(pruning/compact.py) turns it into a physically smaller model. Both give the same logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.reporting import atomic_write


class PlanError(ValueError):
    """A plan that does not fit the model, or bad selection arguments; the message says which."""


@dataclasses.dataclass(frozen=True)
class PruningPlan:
    """Per MoE layer index: the kept experts (original router ids, ascending) and, per kept
    expert, its kept dims (ascending indices into that expert's original width)."""

    method: str
    scope: str
    ratio: float
    source_widths: dict[int, tuple[int, ...]]  # layer -> widths of every expert before pruning
    experts: dict[int, tuple[int, ...]]
    dims: dict[int, dict[int, tuple[int, ...]]]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -------------------------------------------------------------- checks
    def check(self, cfg: ModelConfig) -> None:
        """Raise `PlanError` unless this plan was made for `cfg` and is internally consistent."""
        have = {i: tuple(cfg.expert_widths[i]) for i in cfg.moe_layers}
        if have != self.source_widths:
            for layer in sorted(set(have) | set(self.source_widths)):
                if have.get(layer) != self.source_widths.get(layer):
                    raise PlanError(f"plan ({self.method}, {self.scope}, ratio {self.ratio}) was made for a model "
                                    f"whose MoE layer {layer} has expert widths {self.source_widths.get(layer)}; "
                                    f"this model has {have.get(layer)}")
        for layer, kept in self.experts.items():
            widths = self.source_widths[layer]
            if not kept or list(kept) != sorted(set(kept)) or kept[-1] >= len(widths):
                raise PlanError(f"plan: layer {layer} keeps experts {kept}; expected ascending ids in "
                                f"[0, {len(widths)})")
            if len(kept) < cfg.num_experts_per_tok:
                raise PlanError(f"plan: layer {layer} keeps {len(kept)} experts, fewer than top_k="
                                f"{cfg.num_experts_per_tok}")
            if sorted(self.dims[layer]) != list(kept):
                raise PlanError(f"plan: layer {layer} lists dims for experts {sorted(self.dims[layer])}, "
                                f"but keeps experts {list(kept)}")
            for e, d in self.dims[layer].items():
                if not d or list(d) != sorted(set(d)) or d[-1] >= widths[e]:
                    raise PlanError(f"plan: layer {layer} expert {e} keeps dims {d[:8]}...; expected >= 1 "
                                    f"ascending index in [0, {widths[e]})")

    # -------------------------------------------------------------- summaries
    def kept_widths(self, layer: int) -> tuple[int, ...]:
        return tuple(len(self.dims[layer][e]) for e in self.experts[layer])

    def dims_removed_fraction(self) -> float:
        before = sum(sum(w) for w in self.source_widths.values())
        after = sum(sum(self.kept_widths(layer)) for layer in self.experts)
        return 1.0 - after / before

    def summary(self) -> str:
        rows = [f"{self.method} / {self.scope} / ratio {self.ratio:g}: "
                f"{self.dims_removed_fraction():.1%} of routed-expert dims removed"]
        for layer in sorted(self.experts):
            w = self.kept_widths(layer)
            rows.append(f"  layer {layer}: {len(w)}/{len(self.source_widths[layer])} experts, widths "
                        f"{min(w)}..{max(w)} (sum {sum(w)} of {sum(self.source_widths[layer])})")
        return "\n".join(rows)

    # -------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "scope": self.scope, "ratio": self.ratio,
            "source_widths": {str(k): list(v) for k, v in self.source_widths.items()},
            "experts": {str(k): list(v) for k, v in self.experts.items()},
            "dims": {str(k): {str(e): list(d) for e, d in v.items()} for k, v in self.dims.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruningPlan:
        try:
            return cls(
                method=str(d["method"]), scope=str(d["scope"]), ratio=float(d["ratio"]),
                source_widths={int(k): tuple(int(x) for x in v) for k, v in d["source_widths"].items()},
                experts={int(k): tuple(int(x) for x in v) for k, v in d["experts"].items()},
                dims={int(k): {int(e): tuple(int(x) for x in dd) for e, dd in v.items()} for k, v in d["dims"].items()},
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise PlanError(f"not a PruningPlan dict: {err!r}; expected keys method, scope, ratio, "
                            "source_widths, experts, dims") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise PlanError(f"{path}: cannot read a pruning plan ({err})") from err
        try:
            return cls.from_dict(data)
        except PlanError as err:
            raise PlanError(f"{path}: {err}") from None


def masks(cfg: ModelConfig, plan: PruningPlan) -> dict[str, dict[str, jnp.ndarray]]:
    """`model.forward` masks that simulate the plan on the unpruned model."""
    plan.check(cfg)
    out = {}
    for layer in cfg.moe_layers:
        E, F = cfg.experts_per_layer[layer], cfg.max_width(layer)
        dims_EF = np.zeros((E, F), np.float32)
        experts_E = np.zeros(E, np.float32)
        for e in plan.experts[layer]:
            experts_E[e] = 1.0
            dims_EF[e, list(plan.dims[layer][e])] = 1.0
        out[cfg.layer_name(layer)] = {"dims": jnp.asarray(dims_EF), "experts": jnp.asarray(experts_E)}
    return out
