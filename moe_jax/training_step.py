"""One training step: optimiser, losses and the jit-compiled update, on one device or a mesh.

`train_step(state, batch, cfg=..., settings=...)` is one AdamW update of next-token cross-entropy
plus the Switch/Mixtral load-balancing loss and the router z-loss (`loss_fn`); `StepSettings` is
the part of a training config it depends on. `sharded_train_step` is the same step with the state
kept sharded on a mesh between steps (partition rules from `moe_jax.sharding`).
`moe_jax.train` runs the loop around it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from moe_jax import model, sharding
from moe_jax.checkpoint import TrainState
from moe_jax.config import ModelConfig
from moe_jax.sharding.rules import DEFAULT_RULES, Rule


# ============================================================================== optimiser
@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The part of the config a train step depends on; hashable, so it is a jit static argument
    and equal configs share one compiled step (a resumed run in the same process compiles nothing)."""

    steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float
    aux_coef: float
    z_coef: float
    impl: str

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | StepSettings) -> StepSettings:
        if isinstance(config, StepSettings):
            return config
        o, loss = config.optim, config.loss
        return cls(int(config.steps), float(o.lr), int(o.warmup_steps), float(o.min_lr_ratio), float(o.b1),
                   float(o.b2), float(o.eps), float(o.weight_decay), float(o.clip_norm), float(loss.aux_coef),
                   float(loss.z_coef), str(config.impl))


def make_schedule(config: ml_collections.ConfigDict | StepSettings) -> optax.Schedule:
    """Linear warm-up from 0 to ``optim.lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    s = StepSettings.from_config(config)
    warmup = max(min(s.warmup_steps, s.steps - 1), 0)
    return optax.warmup_cosine_decay_schedule(0.0, s.lr, warmup, s.steps, s.lr * s.min_lr_ratio)


def make_optimizer(config: ml_collections.ConfigDict | StepSettings) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule (no weight decay on vectors: norms, biases)."""
    s = StepSettings.from_config(config)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(s.clip_norm),
        optax.adamw(make_schedule(s), b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay,
                    mask=decay_mask),
    )


def init_state(cfg: ModelConfig, config: ml_collections.ConfigDict) -> TrainState:
    """Fresh params from ``config.seed`` and their optimizer state, at step 0."""
    rng = jax.random.PRNGKey(config.seed)
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(cfg, init_rng, jnp.float32)
    return TrainState(params, make_optimizer(config).init(params), jnp.zeros((), jnp.int32), state_rng)


# ============================================================================== losses
def load_balancing_loss(scores_BTE: jax.Array, idx_BTK: jax.Array, valid_BT: jax.Array) -> jax.Array:
    """Switch/Mixtral balance loss E * sum_e f_e * P_e over the valid tokens.

    f_e: fraction of the T*K routed (token, slot) assignments that went to expert e (no
    gradient); P_e: mean router probability of e (scores renormalised per token, so sigmoid
    routers work too). Uniform routing gives 1; all tokens on K experts gives E/K.
    """
    E = scores_BTE.shape[-1]
    w_BT = valid_BT.astype(jnp.float32)
    n_tokens = jnp.maximum(w_BT.sum(), 1.0)
    counts_E = jnp.sum(jax.nn.one_hot(idx_BTK, E, dtype=jnp.float32) * w_BT[..., None, None], axis=(0, 1, 2))
    f_E = jax.lax.stop_gradient(counts_E / (n_tokens * idx_BTK.shape[-1]))
    probs_BTE = scores_BTE / jnp.maximum(scores_BTE.sum(-1, keepdims=True), 1e-9)
    p_E = jnp.sum(probs_BTE * w_BT[..., None], axis=(0, 1)) / n_tokens
    return E * jnp.sum(f_E * p_E)


def router_z_loss(logits_BTE: jax.Array, valid_BT: jax.Array) -> jax.Array:
    """Mean over valid tokens of logsumexp(router logits)^2 (ST-MoE): keeps router logits small."""
    w_BT = valid_BT.astype(jnp.float32)
    z_BT = jax.nn.logsumexp(logits_BTE.astype(jnp.float32), axis=-1)
    return jnp.sum(z_BT**2 * w_BT) / jnp.maximum(w_BT.sum(), 1.0)


def masked_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array):
    """(sum of weighted token CE, sum of weights) so callers can average over any grouping."""
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    return jnp.sum(ce_BT * weights_BT, axis=-1), jnp.sum(weights_BT, axis=-1)


def _shifted(batch):
    """Row t predicts token t+1 (the pipeline's convention); a token is real if its segment id > 0.

    Packed rows attend within their segment and restart positions there (`model.forward`'s
    segment_ids), so packing changes the batch shape, not what each example sees.
    """
    tokens_BT, segment_ids_BT = batch["tokens"], batch["segment_ids"]
    return (tokens_BT[:, :-1], tokens_BT[:, 1:], batch["loss_mask"][:, 1:], segment_ids_BT[:, :-1] > 0,
            segment_ids_BT[:, :-1])


def loss_fn(params, cfg: ModelConfig, batch, *, aux_coef: float, z_coef: float, impl: str = "auto"):
    """Total loss = CE + aux_coef * balance + z_coef * z, the router terms averaged over MoE layers."""
    inputs_BT, targets_BT, weights_BT, valid_BT, segment_ids_BT = _shifted(batch)
    logits_BTV, aux = model.forward(cfg, params, inputs_BT, segment_ids=segment_ids_BT, capture=("routing",),
                                    impl=impl)
    ce_sum_B, weight_B = masked_cross_entropy(logits_BTV, targets_BT, weights_BT)
    ce = ce_sum_B.sum() / jnp.maximum(weight_B.sum(), 1.0)
    balance = [load_balancing_loss(a["scores_TE"], a["idx_TK"], valid_BT) for a in aux.values()]
    z = [router_z_loss(a["logits_TE"], valid_BT) for a in aux.values()]
    balance = jnp.mean(jnp.stack(balance)) if balance else jnp.zeros(())
    z = jnp.mean(jnp.stack(z)) if z else jnp.zeros(())
    total = ce + aux_coef * balance + z_coef * z
    return total, {"loss": total, "ce": ce, "aux": balance, "z": z}


@functools.partial(jax.jit, static_argnames=("cfg", "settings"))
def train_step(state: TrainState, batch, *, cfg: ModelConfig, settings: StepSettings):
    """One AdamW update on `batch`: returns (new state, metrics incl. grad norm and lr)."""
    loss = functools.partial(loss_fn, cfg=cfg, aux_coef=settings.aux_coef, z_coef=settings.z_coef,
                             impl=settings.impl)
    grads, metrics = jax.grad(loss, has_aux=True)(state.params, batch=batch)
    updates, opt_state = make_optimizer(settings).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=make_schedule(settings)(state.step))
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def make_train_step(cfg: ModelConfig, config: ml_collections.ConfigDict) -> Callable:
    """``train_step(state, batch) -> (state, metrics)`` bound to this model and config."""
    return functools.partial(train_step, cfg=cfg, settings=StepSettings.from_config(config))


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def eval_step(params, batch, *, cfg: ModelConfig, impl: str = "auto"):
    """Per-row masked CE ``(ce_sum_B, weight_B)``, so callers can average per domain."""
    inputs_BT, targets_BT, weights_BT, _, segment_ids_BT = _shifted(batch)
    logits_BTV = model.forward(cfg, params, inputs_BT, segment_ids=segment_ids_BT, impl=impl)
    return masked_cross_entropy(logits_BTV, targets_BT, weights_BT)


def make_eval_step(cfg: ModelConfig, impl: str = "auto") -> Callable:
    return functools.partial(eval_step, cfg=cfg, impl=impl)


# ============================================================================== on a mesh
def sharded_train_step(cfg: ModelConfig, config, mesh: Mesh, state: TrainState, batch_size: int,
                       rules: Sequence[Rule] = DEFAULT_RULES) -> tuple[TrainState, Callable]:
    """(state placed on `mesh`, step(state, batch) -> (state, metrics)): `train_step` with the state
    kept sharded between steps (`sharding.train_state_shardings`) and the batch split over the batch axes."""
    settings = StepSettings.from_config(config)
    sharding.entry.check_fits(cfg, mesh, settings.impl)
    state_sh = sharding.train_state_shardings(state, mesh, rules)
    step = functools.partial(train_step, cfg=cfg, settings=settings)
    batch_sh = sharding.batch_sharding(mesh, batch_size)
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
                     donate_argnums=())
    run = sharding.entry.on_mesh(mesh, lambda state, batch: jitted(state, jax.device_put(batch, batch_sh)))
    return jax.device_put(state, state_sh), run
