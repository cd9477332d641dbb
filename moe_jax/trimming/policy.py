"""TrimmingPolicy: run-time expert trimming thresholds, bound to the router weights they were made for.

A policy holds one `LayerTrim` (tau, top_p, max_active) for every MoE layer, with per-layer
overrides, and the fingerprint of the router weights it was calibrated on. Thresholds on
gates only mean what calibration measured while the routers that produce the gates stay
frozen: `masks` refuses to build trimming masks for routers that differ (`RouterDriftError`).
Saved as JSON beside the model (`trimming_policy.json`), written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.reporting import atomic_write

FORMAT = "moe_jax.trimming_policy/1"
FILENAME = "trimming_policy.json"


class TrimmingError(ValueError):
    """Thresholds out of range, or a policy that does not fit the model; the message says which."""


class RouterDriftError(TrimmingError):
    """The model's router weights differ from those the policy was calibrated on (frozen-router rule)."""


@dataclasses.dataclass(frozen=True)
class LayerTrim:
    """Trimming of one layer's chosen experts (see `moe_jax.model.moe.trim`).

    tau: drop a choice whose gate, renormalised over the K chosen, is below tau; in [0, 1).
    top_p: keep the best choices until they hold top_p of the gate mass; in (0, 1], 1 = off.
    max_active: at most this many experts per token; in [1, top_k], None = top_k.
    Every token keeps its best expert whatever the thresholds.
    """

    tau: float = 0.0
    top_p: float = 1.0
    max_active: int | None = None

    def check(self, top_k: int, where: str = "") -> None:
        at = f" ({where})" if where else ""
        if not (isinstance(self.tau, (int, float)) and 0.0 <= self.tau < 1.0):
            raise TrimmingError(f"tau={self.tau!r}{at}: expected a number in [0, 1) (a gate of 1 is never dropped)")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise TrimmingError(f"top_p={self.top_p!r}{at}: expected a number in (0, 1]")
        if self.max_active is not None and (not isinstance(self.max_active, (int, np.integer))
                                            or not 1 <= self.max_active <= top_k):
            raise TrimmingError(f"max_active={self.max_active!r}{at}: expected an integer in [1, top_k={top_k}] "
                                "(or None for top_k)")

    def is_identity(self, top_k: int) -> bool:
        return self.tau == 0.0 and self.top_p >= 1.0 and (self.max_active is None or self.max_active >= top_k)

    def to_json(self) -> dict[str, Any]:
        return {"tau": float(self.tau), "top_p": float(self.top_p), "max_active": self.max_active}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> LayerTrim:
        if not isinstance(d, Mapping):
            raise TrimmingError(f"{where}: expected an object with tau/top_p/max_active, got {d!r}")
        unknown = set(d) - {"tau", "top_p", "max_active"}
        if unknown:
            raise TrimmingError(f"{where}: unknown key(s) {sorted(unknown)}; expected tau, top_p, max_active")
        return cls(d.get("tau", 0.0), d.get("top_p", 1.0), d.get("max_active"))


def router_fingerprint(cfg: ModelConfig, params: Mapping[str, Any]) -> str:
    """blake2b of every MoE layer's router weights (kernel and score bias, float32 bytes and shape)."""
    h = hashlib.blake2b(digest_size=16)
    for i in cfg.moe_layers:
        moe = params[cfg.layer_name(i)]["moe"]
        for leaf in (moe["router"]["kernel"], moe.get("score_bias")):
            if leaf is not None:
                a = np.asarray(leaf, np.float32)
                h.update(f"{cfg.layer_name(i)}{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _model_facts(cfg: ModelConfig) -> dict[str, Any]:
    return {"model_type": cfg.model_type, "top_k": cfg.num_experts_per_tok,
            "moe_layers": {cfg.layer_name(i): cfg.experts_per_layer[i] for i in cfg.moe_layers}}


@dataclasses.dataclass(frozen=True)
class TrimmingPolicy:
    """Thresholds for every MoE layer (`default`, with `layers` overrides by layer name)."""

    default: LayerTrim
    layers: dict[str, LayerTrim]
    model: dict[str, Any]  # model_type, top_k, {layer name: experts}: for clear mismatch errors
    router_fingerprint: str
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)  # what calibration measured

    @classmethod
    def for_model(cls, cfg: ModelConfig, params: Mapping[str, Any], default: LayerTrim | None = None,
                  layers: Mapping[str, LayerTrim] | None = None,
                  calibration: Mapping[str, Any] | None = None) -> TrimmingPolicy:
        policy = cls(default or LayerTrim(), dict(layers or {}), _model_facts(cfg), router_fingerprint(cfg, params),
                     dict(calibration or {}))
        policy.check(cfg)
        return policy

    def for_layer(self, name: str) -> LayerTrim:
        return self.layers.get(name, self.default)

    # -------------------------------------------------------------- checks
    def check(self, cfg: ModelConfig, params: Mapping[str, Any] | None = None) -> None:
        """Raise unless the policy fits `cfg` (and, given `params`, its routers are the calibrated ones)."""
        have = _model_facts(cfg)
        if have["top_k"] != self.model.get("top_k") or have["moe_layers"] != self.model.get("moe_layers"):
            raise TrimmingError(
                f"trimming policy was calibrated for a {self.model.get('model_type')} model with top_k="
                f"{self.model.get('top_k')} and MoE layers {self.model.get('moe_layers')} (name: experts); this "
                f"model is {have['model_type']} with top_k={have['top_k']} and {have['moe_layers']}")
        K = cfg.num_experts_per_tok
        self.default.check(K, "default")
        unknown = set(self.layers) - set(have["moe_layers"])
        if unknown:
            raise TrimmingError(f"trimming policy overrides layer(s) {sorted(unknown)}, which are not MoE layers "
                                f"of this model ({sorted(have['moe_layers'])})")
        for name, trim in self.layers.items():
            trim.check(K, name)
        if params is not None:
            got = router_fingerprint(cfg, params)
            if got != self.router_fingerprint:
                raise RouterDriftError(
                    f"router weights changed since this trimming policy was calibrated (fingerprint {got} != "
                    f"{self.router_fingerprint}): its thresholds no longer mean what was measured. Re-calibrate "
                    "(trimming.calibrate) on the model you serve, or restore the calibrated routers")

    # -------------------------------------------------------------- use
    def masks(self, cfg: ModelConfig, params: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict:
        """`model.forward` masks that trim every MoE layer, merged into `base` (e.g. pruning masks).

        Checks the routers first (frozen-router rule). Thresholds travel as arrays, so one
        compilation serves every policy of the same model."""
        self.check(cfg, params)
        out = {name: dict(layer) for name, layer in (base or {}).items()}
        for i in cfg.moe_layers:
            name = cfg.layer_name(i)
            t = self.for_layer(name)
            if "trim" in out.get(name, {}):
                raise TrimmingError(f"masks for {name} already hold trimming; merge one policy at a time")
            out.setdefault(name, {})["trim"] = {
                "tau": jnp.float32(t.tau), "top_p": jnp.float32(t.top_p),
                "max_active": jnp.int32(cfg.num_experts_per_tok if t.max_active is None else t.max_active)}
        return out

    # -------------------------------------------------------------- io
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "default": self.default.to_json(),
                "layers": {k: v.to_json() for k, v in sorted(self.layers.items())},
                "model": self.model, "router_fingerprint": self.router_fingerprint, "calibration": self.calibration}

    def save(self, path: str | os.PathLike) -> Path:
        """Write to `path` (a directory gets `trimming_policy.json`) atomically; returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        return atomic_write(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrimmingPolicy:
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise TrimmingError(f"{path}: no trimming policy there") from None
        except json.JSONDecodeError as err:
            raise TrimmingError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise TrimmingError(f"{path}: format is {got!r}, expected {FORMAT!r}")
        missing = {"default", "layers", "model", "router_fingerprint"} - set(d)
        if missing:
            raise TrimmingError(f"{path}: missing key(s) {sorted(missing)}")
        layers = d["layers"]
        if not isinstance(layers, Mapping):
            raise TrimmingError(f"{path}: 'layers' must be an object of layer name -> thresholds")
        policy = cls(LayerTrim.from_json(d["default"], f"{path}: default"),
                     {k: LayerTrim.from_json(v, f"{path}: layers.{k}") for k, v in layers.items()},
                     dict(d["model"]), str(d["router_fingerprint"]), dict(d.get("calibration", {})))
        top_k = policy.model.get("top_k")
        if not isinstance(top_k, int) or top_k < 1:
            raise TrimmingError(f"{path}: model.top_k is {top_k!r}, expected a positive integer")
        policy.default.check(top_k, f"{path}: default")
        for name, trim in policy.layers.items():
            trim.check(top_k, f"{path}: layers.{name}")
        return policy
