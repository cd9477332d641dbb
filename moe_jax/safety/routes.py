"""Prompts laid out for attacks, forced routes as `forward` masks, and what the routing did.

A route assignment is, per MoE layer, a (n_prompt_tokens, E_l) 0/1 array of the experts each
prompt token may use (all ones: the router chooses freely). Forcing a token's top-k set means
allowing exactly k experts; they run with the router's own scores as weights (`moe.route`),
so forcing the router's own choice is the identity. The same assignment is placed into any
left-padded layout (prompt + target for scoring, prompt alone for generation) by `force_masks`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.model import decode, transformer

Routes = list[np.ndarray]  # per MoE layer (in cfg.moe_layers order): (n_prompt_tokens, E_l) bool


@dataclasses.dataclass(frozen=True)
class Rows:
    """Left-padded rows [pad, prompt, target]; target may be empty (generation layout)."""

    tokens_BT: np.ndarray
    attn_BT: np.ndarray
    prompt_start_B: np.ndarray  # column of each row's first prompt token
    prompt_len_B: np.ndarray
    target_BT: np.ndarray  # 1.0 at the target tokens (the positions whose log-prob is scored)

    @property
    def width(self) -> int:
        return int(self.tokens_BT.shape[1])


def layout(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]] | None, pad_id: int,
           width: int | None = None) -> Rows:
    """Right-align each prompt (+ its target) in a row of `width` (default: the longest)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("safety: need at least one prompt, and every prompt needs >= 1 token")
    targets = [[] for _ in prompts] if targets is None else [list(t) for t in targets]
    if len(targets) != len(prompts):
        raise ValueError(f"safety: {len(prompts)} prompts but {len(targets)} targets")
    need = max(len(p) + len(t) for p, t in zip(prompts, targets))
    width = need if width is None else int(width)
    if width < need:
        raise ValueError(f"safety: layout width {width} is shorter than the longest prompt + target ({need})")
    B = len(prompts)
    tokens = np.full((B, width), pad_id, np.int32)
    attn = np.zeros((B, width), bool)
    target = np.zeros((B, width), np.float32)
    start = np.zeros(B, np.int32)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        row = list(p) + t
        s = width - len(row)
        tokens[i, s:], attn[i, s:] = row, True
        target[i, s + len(p):] = 1.0
        start[i] = s
    return Rows(tokens, attn, start, np.array([len(p) for p in prompts], np.int32), target)


def free_routes(cfg: ModelConfig, n_tokens: int) -> Routes:
    """An assignment that forces nothing."""
    return [np.ones((n_tokens, cfg.experts_per_layer[lyr]), bool) for lyr in cfg.moe_layers]


def force_masks(cfg: ModelConfig, rows: Rows, routes: Sequence[Routes], base: Mapping | None = None) -> dict:
    """`forward` masks placing each row's route assignment at its prompt columns.

    base: masks to keep (pruning "dims"/"experts", trimming); "force" is added per layer.
    """
    if len(routes) != len(rows.tokens_BT):
        raise ValueError(f"safety: {len(routes)} route assignments for {len(rows.tokens_BT)} rows")
    out = {name: dict(m) for name, m in (base or {}).items()}
    B, T = rows.tokens_BT.shape
    for li, lyr in enumerate(cfg.moe_layers):
        E = cfg.experts_per_layer[lyr]
        force = np.ones((B, T, E), np.float32)
        for b, r in enumerate(routes):
            s, n = int(rows.prompt_start_B[b]), int(rows.prompt_len_B[b])
            if r[li].shape != (n, E):
                raise ValueError(f"safety: row {b} layer {lyr}: route assignment has shape {r[li].shape}, "
                                 f"expected (prompt tokens, experts) = {(n, E)}")
            force[b, s:s + n] = r[li]
        out.setdefault(cfg.layer_name(lyr), {})["force"] = jnp.asarray(force)
    return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _target_logprob(cfg, params, tokens_BT, attn_BT, target_BT, masks):
    logits_BTV = transformer.forward(cfg, params, tokens_BT, masks, attention_mask=attn_BT)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
    lp_BT = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(lp_BT * target_BT[:, 1:], axis=-1)


def target_logprob(cfg: ModelConfig, params, rows: Rows, masks: Mapping | None = None) -> np.ndarray:
    """Sum of log p(target token | prefix) per row under `masks` (B,)."""
    return np.asarray(_target_logprob(cfg, params, jnp.asarray(rows.tokens_BT), jnp.asarray(rows.attn_BT),
                                      jnp.asarray(rows.target_BT), masks), np.float64)


_WIDTH_MULTIPLE = 8  # generation rows are left-padded to a multiple of this (their count to a power of two)


def generate_texts(cfg: ModelConfig, params, tokenizer, prompts: Sequence[Sequence[int]],
                   routes: Sequence[Routes] | None = None, masks: Mapping | None = None,
                   max_new_tokens: int = 16) -> list[str]:
    """Greedy completions (up to EOS) with each prompt's routes forced during prefill.

    The batch is padded to a bucketed shape (extra rows repeat the first prompt and its routes;
    their outputs are dropped), so an audit's many generation calls share a few compiled programs."""
    n = len(prompts)
    if n == 0:
        raise ValueError("safety: need at least one prompt, and every prompt needs >= 1 token")
    rows_B = 1 << (n - 1).bit_length()
    prompts = list(prompts) + [prompts[0]] * (rows_B - n)
    width = -(-max(len(p) for p in prompts) // _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE
    rows = layout(prompts, None, tokenizer.pad_id, width=width)
    if routes is not None:
        if len(routes) != n:
            raise ValueError(f"safety: {len(routes)} route assignments for {n} rows")
        masks = force_masks(cfg, rows, list(routes) + [routes[0]] * (rows_B - n), masks)
    out = decode.generate(cfg, params, rows.tokens_BT, max_new_tokens, attention_mask=rows.attn_BT,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, masks=masks)
    texts = []
    for ids in out[:n]:
        ids = [int(i) for i in ids]
        ids = ids[:ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids
        texts.append(tokenizer.decode(ids))
    return texts


def captured_routing(cfg: ModelConfig, params, rows: Rows, masks: Mapping | None = None,
                     capture: tuple[str, ...] = ("routing",)) -> dict:
    """Per MoE layer name: the routing (idx/weights/active/...) of every row, as numpy."""
    _, aux = transformer.forward(cfg, params, jnp.asarray(rows.tokens_BT), masks,
                                 attention_mask=jnp.asarray(rows.attn_BT), capture=capture)
    return jax.tree_util.tree_map(np.asarray, aux)


def executed_experts(aux_layer: Mapping[str, np.ndarray]) -> np.ndarray:
    """(B, T, K) expert ids that really ran (-1 where trimming dropped a choice or weight is 0)."""
    idx = np.asarray(aux_layer["idx_TK"])
    ran = np.asarray(aux_layer["active_TK"], bool) & (np.asarray(aux_layer["weights_TK"]) != 0)
    return np.where(ran, idx, -1)

