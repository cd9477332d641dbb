"""Can an input wake a given expert? Input-side attacks that maximise routing to target experts.

  gcg        a discrete suffix of `suffix_len` tokens appended to the prompts, optimised by
             greedy coordinate gradient (Zou et al. 2023) on the router: the gradient of the
             objective with respect to the suffix's one-hot tokens proposes `topk_tokens`
             substitutions per position, `candidates` random single swaps are scored exactly,
             the best is kept;
  embedding  the suffix's embeddings moved freely by Adam (an upper bound: no real token
             sequence need reach them).

Objective: the mean over suffix tokens and target (layer, expert) pairs of the router's log
probability of the target (log-softmax of the router logits; log-sigmoid for sigmoid routers).
Reached = the expert really ran: it is among a token's executed top-k with a non-zero weight.

Targets are named by their *original* expert ids. For a pruned model pass its `PruningPlan`:
a removed expert has no router column, so nothing can route to it; the attack optimises what
remains and counts the removed ones as reached 0 times (by construction, and checked by
transferring the adversarial input found on the unpruned model).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax.config import ModelConfig
from moe_jax.model import transformer
from moe_jax.safety import routes as R
from moe_jax.safety.attacks import AttackError, check_budget

METHODS = ("gcg", "embedding")


@dataclasses.dataclass
class ReachResult:
    method: str
    target: dict[int, list[int]]  # layer -> original expert ids
    present: dict[int, list[int]]  # layer -> model router indices of the targets that exist
    activations: int  # (row, token, layer) slots where a target expert ran
    activations_per_layer: dict[int, int]
    max_target_prob: float  # largest router probability any target got on any real token
    objective_before: float
    objective_after: float
    queries: int
    seconds: float
    activations_before: int  # with the initial random suffix, unperturbed
    suffix: list[int] | None = None  # gcg: the adversarial suffix token ids
    embed_delta: np.ndarray | None = None  # the (B, T, D) input perturbation that was found
    rows: R.Rows | None = None

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "activations_before": self.activations_before,
                "activations": self.activations, "max_target_prob": self.max_target_prob,
                "objective_before": self.objective_before, "objective_after": self.objective_after,
                "queries": self.queries, "seconds": round(self.seconds, 2)}


def resolve_target(cfg: ModelConfig, target: Mapping[int, Sequence[int]], plan=None) -> dict[int, list[int]]:
    """Original expert ids -> this model's router indices (removed experts drop out).

    A layer that is not MoE, or an expert id beyond the layer's original expert count, is an
    error naming it."""
    if not target:
        raise AttackError("reachability: the target expert set is empty")
    present: dict[int, list[int]] = {}
    for layer, experts in target.items():
        layer = int(layer)
        if layer not in cfg.moe_layers:
            raise AttackError(f"reachability target: layer {layer} is not an MoE layer (MoE layers: "
                              f"{list(cfg.moe_layers)})")
        original = len(plan.source_widths[layer]) if plan is not None else cfg.experts_per_layer[layer]
        kept = list(plan.experts[layer]) if plan is not None else list(range(original))
        for e in experts:
            if not 0 <= int(e) < original:
                raise AttackError(f"reachability target: expert {e} does not exist in layer {layer} "
                                  f"({original} experts: ids 0..{original - 1})")
        present[layer] = [kept.index(int(e)) for e in experts if int(e) in kept]
    return present


def _target_arrays(cfg: ModelConfig, present: Mapping[int, Sequence[int]]) -> dict:
    """Per MoE layer name: (E,) float 1 at the present targets (layers without targets omitted)."""
    out = {}
    for layer, idx in present.items():
        if idx:
            v = np.zeros(cfg.experts_per_layer[layer], np.float32)
            v[list(idx)] = 1.0
            out[cfg.layer_name(layer)] = jnp.asarray(v)
    return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _objective(cfg, params, tokens_BT, attn_BT, score_BT, delta_BTD, targets, masks):
    """(B,) mean over scored tokens and target experts of the router's log-probability."""
    _, aux = transformer.forward(cfg, params, tokens_BT, masks, attention_mask=attn_BT, capture=("moe_inputs",),
                                 embed_delta=delta_BTD)
    total, count = 0.0, 0.0
    for name, t_E in targets.items():
        kernel = params[name]["moe"]["router"]["kernel"]
        logits_BTE = jnp.einsum("btd,de->bte", aux[name]["x"].astype(jnp.float32), kernel.astype(jnp.float32))
        if cfg.router_score == "softmax":
            logp_BTE = jax.nn.log_softmax(logits_BTE, axis=-1)
        else:
            logp_BTE = jax.nn.log_sigmoid(logits_BTE)
        total = total + jnp.sum(logp_BTE * t_E * score_BT[..., None], axis=(1, 2))
        count = count + jnp.sum(t_E) * jnp.sum(score_BT, axis=1)
    return total / jnp.maximum(count, 1.0)


_grad_objective = jax.jit(jax.grad(lambda *a: jnp.sum(_objective(*a)), argnums=5), static_argnums=(0,))


def count_activations(cfg: ModelConfig, params, rows: R.Rows, present: Mapping[int, Sequence[int]],
                      masks: Mapping | None = None, embed_delta: np.ndarray | None = None) -> tuple[int, dict, float]:
    """(activations, per layer, max router probability of a target) over the rows' real tokens."""
    _, aux = transformer.forward(cfg, params, jnp.asarray(rows.tokens_BT), masks,
                                 attention_mask=jnp.asarray(rows.attn_BT), capture=("routing",),
                                 embed_delta=None if embed_delta is None else jnp.asarray(embed_delta))
    per_layer, max_prob = {}, 0.0
    for layer, idx in present.items():
        a = jax.tree_util.tree_map(np.asarray, aux[cfg.layer_name(layer)])
        ran = R.executed_experts(a)[rows.attn_BT]
        per_layer[layer] = int(np.isin(ran, list(idx)).sum()) if idx else 0
        if idx:
            max_prob = max(max_prob, float(a["scores_TE"][rows.attn_BT][:, list(idx)].max()))
    return sum(per_layer.values()), per_layer, max_prob


def _special(tokenizer) -> set[int]:
    return {i for i in (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) if i is not None}


def reachability(cfg: ModelConfig, params, tokenizer, prompts: Sequence[Sequence[int]],
                 target: Mapping[int, Sequence[int]], *, method: str = "gcg", plan=None, masks: Mapping | None = None,
                 suffix_len: int = 4, steps: int = 30, candidates: int = 64, topk_tokens: int = 16,
                 learning_rate: float = 0.05, seed: int = 0) -> ReachResult:
    """Search an input that routes `prompts` (+ a suffix) to the target experts; count what ran.

    Budget: `steps` iterations; gcg scores `candidates` suffixes per step (queries =
    steps * candidates * len(prompts)), embedding takes `steps` Adam steps.
    """
    if method not in METHODS:
        raise AttackError(f"reachability method={method!r}: expected one of {METHODS}")
    suffix_len = check_budget("suffix_len", suffix_len)
    steps = check_budget("steps", steps)
    candidates = check_budget("candidates", candidates)
    topk_tokens = check_budget("topk_tokens", topk_tokens)
    t0 = time.perf_counter()
    present = resolve_target(cfg, target, plan)
    targets = _target_arrays(cfg, present)
    rng = np.random.default_rng([seed, 9011])
    vocab = np.array([v for v in range(cfg.vocab_size) if v not in _special(tokenizer)])
    suffix = [int(v) for v in rng.choice(vocab, size=suffix_len)]
    P, D = len(prompts), cfg.hidden_size

    def make_rows(sfx):
        rows = R.layout([list(p) + list(sfx) for p in prompts], None, tokenizer.pad_id)
        score = np.zeros(rows.tokens_BT.shape, np.float32)
        score[:, -suffix_len:] = 1.0  # the suffix is right-aligned
        return rows, score

    rows, score = make_rows(suffix)
    zero = np.zeros(rows.tokens_BT.shape + (D,), np.float32)

    def objective(rows_, score_, delta):
        if not targets:
            return np.zeros(len(rows_.tokens_BT))
        return np.asarray(_objective(cfg, params, jnp.asarray(rows_.tokens_BT), jnp.asarray(rows_.attn_BT),
                                     jnp.asarray(score_), jnp.asarray(delta), targets, masks))

    before = float(objective(rows, score, zero).mean())
    acts_before = count_activations(cfg, params, rows, present, masks)[0]
    after, queries, delta = before, P, None
    if targets and method == "gcg":
        embedding = np.asarray(params["embed"]["embedding"], np.float32)
        best = before
        for _ in range(steps):
            g_BTD = np.asarray(_grad_objective(cfg, params, jnp.asarray(rows.tokens_BT), jnp.asarray(rows.attn_BT),
                                               jnp.asarray(score), jnp.asarray(zero), targets, masks))
            swap_gain = g_BTD[:, -suffix_len:].sum(0) @ embedding.T  # (suffix_len, V): first-order gain of each swap
            swap_gain[:, list(_special(tokenizer))] = -np.inf
            top_swaps = np.argsort(-swap_gain, axis=1)[:, :topk_tokens]
            cands = []
            for _ in range(candidates):
                j = int(rng.integers(suffix_len))
                new = list(suffix)
                new[j] = int(top_swaps[j, rng.integers(topk_tokens)])
                cands.append(new)
            tok = np.repeat(rows.tokens_BT[None], candidates, 0)  # (candidates, prompts, width): new suffixes
            tok[:, :, -suffix_len:] = np.asarray(cands)[:, None, :]
            batch = R.Rows(tok.reshape(candidates * P, -1), np.tile(rows.attn_BT, (candidates, 1)),
                           np.tile(rows.prompt_start_B, candidates), np.tile(rows.prompt_len_B, candidates),
                           np.tile(rows.target_BT, (candidates, 1)))
            vals = objective(batch, np.tile(score, (candidates, 1)), np.tile(zero, (candidates, 1, 1)))
            vals = vals.reshape(candidates, P).mean(1)
            queries += candidates * P
            c = int(np.argmax(vals))
            if vals[c] > best:
                best, suffix = float(vals[c]), cands[c]
                rows, score = make_rows(suffix)
        after = best
    elif targets:
        tx = optax.adam(learning_rate)
        delta_j = jnp.zeros(zero.shape, jnp.float32)
        keep = jnp.asarray(score)[..., None]  # only the suffix embeddings move
        state = tx.init(delta_j)
        args = (jnp.asarray(rows.tokens_BT), jnp.asarray(rows.attn_BT), jnp.asarray(score))
        for _ in range(steps):
            g = _grad_objective(cfg, params, *args, delta_j, targets, masks)
            updates, state = tx.update(-g * keep, state, delta_j)
            delta_j = optax.apply_updates(delta_j, updates) * keep
        delta = np.asarray(delta_j)
        after = float(objective(rows, score, delta).mean())
        queries += steps * P
    acts, per_layer, max_prob = count_activations(cfg, params, rows, present, masks, delta)
    return ReachResult(method, {int(k): [int(e) for e in v] for k, v in target.items()}, present, acts, per_layer,
                       max_prob, before, after, queries, time.perf_counter() - t0, acts_before,
                       suffix if method == "gcg" else None, delta, rows)


def transfer(cfg: ModelConfig, params, found: ReachResult, *, plan=None, masks: Mapping | None = None
             ) -> tuple[int, dict]:
    """Activations of `found.target` when `found`'s adversarial input is fed to another model
    (e.g. the pruned one, with its `plan`): (activations, per layer)."""
    present = resolve_target(cfg, found.target, plan)
    acts, per_layer, _ = count_activations(cfg, params, found.rows, present, masks, found.embed_delta)
    return acts, per_layer
