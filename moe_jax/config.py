"""ModelConfig: one frozen, hashable description of every supported MoE decoder.

The config is the static half of a model (params are the other half). It is hashable so it
can be a `jax.jit` static argument, JSON-serialisable so it travels with checkpoints, and it
records per-layer expert counts and per-expert widths because pruning makes them differ.

It knows nothing of Hugging Face's `config.json`: `moe_jax.hf.config_json.from_hf` reads one of the
six supported families into a ModelConfig and `moe_jax.hf.config_json.to_hf` writes one back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
ROPE_TYPES = ("default", "linear", "yarn")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
QK_NORMS = ("none", "head", "full")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config.json (or ModelConfig field) that moe_jax cannot honour, with the key named."""


@dataclasses.dataclass(frozen=True)
class ExpertBucket:
    """Experts of one layer stored together at one (padded) width.

    Experts of different widths are grouped into a few buckets so a layer is not padded to
    its widest expert; `expert_ids` are router indices, ascending.
    """

    width: int
    expert_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of an MoE decoder (see module docstring)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # Attention.
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 0.0  # 0 means absent from config.json (matters for the formula)
    yarn_mscale_all_dim: float = 0.0
    yarn_attention_factor: float = 0.0  # 0 means derive it from factor and mscales
    yarn_truncate: bool = True
    rope_interleave: bool = False
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"
    clip_qkv: float | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    # Multi-head latent attention (DeepSeek); kv_lora_rank == 0 means ordinary GQA.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Feed-forward.
    dense_intermediate_size: int = 0
    layer_kinds: tuple[str, ...] = ()
    experts_per_layer: tuple[int, ...] = ()
    expert_widths: tuple[tuple[int, ...], ...] = ()
    num_experts_per_tok: int = 2
    router_score: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    router_bias: bool = False
    shared_expert_width: int = 0
    shared_expert_gate: bool = False
    max_width_buckets: int = 8
    hf_extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        *,
        num_experts: int,
        moe_intermediate_size: int,
        dense_layers: Sequence[int] = (),
        **kwargs: Any,
    ) -> ModelConfig:
        """A uniform config: every MoE layer has `num_experts` experts of one width."""
        num_layers = kwargs["num_layers"]
        dense = set(dense_layers)
        kinds = tuple("dense" if i in dense else "moe" for i in range(num_layers))
        return cls(
            layer_kinds=kinds,
            experts_per_layer=tuple(0 if k == "dense" else num_experts for k in kinds),
            expert_widths=tuple(
                () if k == "dense" else (moe_intermediate_size,) * num_experts for k in kinds
            ),
            **kwargs,
        )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_layer_experts(self, layer: int, widths: Sequence[int]) -> ModelConfig:
        """This config with MoE layer `layer` holding experts of the given widths."""
        if self.layer_kinds[layer] != "moe":
            raise ConfigError(f"layer {layer} is a dense layer; it has no experts to resize")
        experts = list(self.experts_per_layer)
        all_widths = list(self.expert_widths)
        experts[layer] = len(widths)
        all_widths[layer] = tuple(int(w) for w in widths)
        return self.replace(experts_per_layer=tuple(experts), expert_widths=tuple(all_widths))

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(field, msg):
            raise ConfigError(f"ModelConfig.{field}: {msg}")

        if self.model_type not in FAMILIES:
            bad("model_type", f"{self.model_type!r} is not supported; expected one of {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if int(getattr(self, name)) <= 0:
                bad(name, f"must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads and not self.is_mla:
            bad("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.rope_type not in ROPE_TYPES:
            bad("rope_type", f"{self.rope_type!r} is not implemented; expected one of {ROPE_TYPES}")
        if self.qk_norm not in QK_NORMS:
            bad("qk_norm", f"{self.qk_norm!r}; expected one of {QK_NORMS}")
        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"{self.topk_method!r}; expected one of {TOPK_METHODS}")
        if self.router_score not in ("softmax", "sigmoid"):
            bad("router_score", f"{self.router_score!r}; expected 'softmax' or 'sigmoid'")
        n = self.num_layers
        if not (len(self.layer_kinds) == len(self.experts_per_layer) == len(self.expert_widths) == n):
            bad("layer_kinds", f"layer_kinds, experts_per_layer and expert_widths need {n} entries")
        for i, (kind, e, widths) in enumerate(
            zip(self.layer_kinds, self.experts_per_layer, self.expert_widths)
        ):
            if kind == "dense":
                if e or widths:
                    bad("experts_per_layer", f"dense layer {i} must have 0 experts, got {e}")
                if self.dense_intermediate_size <= 0:
                    bad("dense_intermediate_size", f"layer {i} is dense but the width is 0")
            elif kind == "moe":
                if len(widths) != e:
                    bad("expert_widths", f"layer {i} lists {len(widths)} widths for {e} experts")
                if e < self.num_experts_per_tok:
                    bad("experts_per_layer",
                        f"layer {i} has {e} experts, fewer than top-k={self.num_experts_per_tok}")
                if any(int(w) <= 0 for w in widths):
                    bad("expert_widths", f"layer {i} has an expert of width <= 0: {widths}; "
                        "remove the expert instead")
                if self.topk_method != "greedy" and e % self.n_group:
                    bad("n_group", f"layer {i} has {e} experts, not divisible by n_group={self.n_group}")
            else:
                bad("layer_kinds", f"layer {i} kind {kind!r}; expected 'dense' or 'moe'")
        if self.topk_method != "greedy" and not (1 <= self.topk_group <= self.n_group):
            bad("topk_group", f"{self.topk_group} must lie in [1, n_group={self.n_group}]")
        if self.is_mla and (self.qk_rope_head_dim <= 0 or self.v_head_dim <= 0):
            bad("qk_rope_head_dim", "MLA needs positive qk_rope_head_dim and v_head_dim")
        if self.max_width_buckets < 1:
            bad("max_width_buckets", f"must be >= 1, got {self.max_width_buckets}")

    # ------------------------------------------------------------------ derived facts
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "moe")

    @property
    def is_uniform(self) -> bool:
        """True if every MoE layer has the same expert count and one width (stock-loadable)."""
        shapes = {self.expert_widths[i] for i in self.moe_layers}
        return len(shapes) <= 1 and all(len(set(w)) <= 1 for w in shapes)

    @property
    def max_experts(self) -> int:
        return max((self.experts_per_layer[i] for i in self.moe_layers), default=0)

    def max_width(self, layer: int) -> int:
        return max(self.expert_widths[layer], default=0)

    def expert_buckets(self, layer: int) -> tuple[ExpertBucket, ...]:
        return _buckets(self.expert_widths[layer], self.max_width_buckets)

    @staticmethod
    def layer_name(layer: int) -> str:
        return f"layer_{layer}"

    def padded_expert_params(self, layer: int) -> tuple[int, int]:
        """(stored, useful) routed-expert intermediate dims of a layer; their gap is padding."""
        stored = sum(b.width * len(b.expert_ids) for b in self.expert_buckets(layer))
        return stored, sum(self.expert_widths[layer])

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hf_extra"] = [list(kv) for kv in self.hf_extra]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"ModelConfig has no field(s) {sorted(unknown)}")
        d = dict(d)
        for key in ("layer_kinds", "experts_per_layer"):
            if key in d:
                d[key] = tuple(d[key])
        if "expert_widths" in d:
            d["expert_widths"] = tuple(tuple(int(w) for w in ws) for ws in d["expert_widths"])
        if "hf_extra" in d:
            d["hf_extra"] = tuple((str(k), str(v)) for k, v in d["hf_extra"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


@functools.lru_cache(maxsize=4096)
def _buckets(widths: tuple[int, ...], max_buckets: int) -> tuple[ExpertBucket, ...]:
    """Group experts into <= max_buckets width classes with the least padding.

    Experts sorted by width are cut into contiguous runs (dynamic programming over cut
    points); each run is stored at its widest member's width. A uniform layer is one bucket
    with no padding at all.
    """
    if not widths:
        return ()
    order = sorted(range(len(widths)), key=lambda e: (widths[e], e))
    w = [widths[e] for e in order]
    n = len(w)
    distinct = len(set(w))
    k_max = min(max_buckets, distinct)
    inf = float("inf")
    # cost[k][j]: least stored dims covering the first j sorted experts with k buckets.
    cost = [[inf] * (n + 1) for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    cost[0][0] = 0
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = cost[k - 1][i] + (j - i) * w[j - 1]
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
    best_k = min(range(1, k_max + 1), key=lambda k: (cost[k][n], k))
    runs, j = [], n
    for k in range(best_k, 0, -1):
        i = cut[k][j]
        runs.append((i, j))
        j = i
    buckets = []
    for i, j in reversed(runs):
        ids = tuple(sorted(order[i:j]))
        buckets.append(ExpertBucket(width=w[j - 1], expert_ids=ids))
    return tuple(buckets)
