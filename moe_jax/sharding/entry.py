"""Input/output shardings of the model's entry points, and jit-compiled sharded versions of them.

Each `sharded_*` returns a callable compiled with `jax.jit(in_shardings=..., out_shardings=...)`
and run under `jax.set_mesh(mesh)` (so impl="expert_parallel" finds its mesh). Params follow the
partition rules; batches are split over the batch axes (data, fsdp, expert) that divide the
batch size (a batch too small for the mesh is replicated on the rest, never rejected); logits
keep the vocab split over `tensor` when it divides; the generate KV cache is pinned to batch x
KV-heads. Inside, XLA (GSPMD) inserts the collectives; the math is the single-device model's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax import scoring
from moe_jax.checkpoint import TrainState
from moe_jax.config import ModelConfig
from moe_jax.model import decode, transformer
from moe_jax.model.expert_parallel import BATCH_AXES
from moe_jax.sharding.mesh import axis_size, check_mesh_fits
from moe_jax.sharding.rules import DEFAULT_RULES, Rule, tree_shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(mesh: Mesh, batch_size: int) -> P:
    """The batch dim over the batch axes (in order) whose running product divides `batch_size`."""
    axes, prod = [], 1
    for a in BATCH_AXES:
        n = axis_size(mesh, a)
        if n > 1 and batch_size % (prod * n) == 0:
            axes.append(a)
            prod *= n
    return P(tuple(axes)) if axes else P()


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """NamedSharding of any (B, ...) array: the leading dim by `batch_spec`, the rest whole."""
    return NamedSharding(mesh, batch_spec(mesh, batch_size))


def _vocab_axis(cfg: ModelConfig, mesh: Mesh) -> str | None:
    n = axis_size(mesh, "tensor")
    return "tensor" if n > 1 and cfg.vocab_size % n == 0 else None


def cache_axes(cfg: ModelConfig, mesh: Mesh, batch_size: int) -> tuple[Any, str | None]:
    """(batch axes, KV-head axis) for `decode.generate(cache_axes=...)`."""
    batch = batch_spec(mesh, batch_size)
    n = axis_size(mesh, "tensor")
    heads = "tensor" if not cfg.is_mla and n > 1 and cfg.num_kv_heads % n == 0 else None
    return (batch[0] if len(batch) else None), heads


def on_mesh(mesh: Mesh, jitted: Callable) -> Callable:
    @functools.wraps(jitted)
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return jitted(*args, **kwargs)
    return call


def check_fits(cfg: ModelConfig, mesh: Mesh, impl: str) -> None:
    check_mesh_fits(cfg, mesh)
    if impl == "expert_parallel" and "expert" not in mesh.axis_names:
        raise ValueError(f"impl='expert_parallel' needs a mesh with an 'expert' axis; got axes {mesh.axis_names}")


# ================================================================================ forward
def forward_shardings(cfg: ModelConfig, mesh: Mesh, params, batch_size: int, rules: Sequence[Rule] = DEFAULT_RULES):
    """((params, tokens) in-shardings, logits out-sharding) for `model.forward`."""
    batch = batch_spec(mesh, batch_size)
    logits = NamedSharding(mesh, P(batch[0] if len(batch) else None, None, _vocab_axis(cfg, mesh)))
    return (tree_shardings(params, mesh, rules), batch_sharding(mesh, batch_size)), logits


def sharded_forward(cfg: ModelConfig, mesh: Mesh, params, batch_size: int, *, impl: str = "auto",
                    rules: Sequence[Rule] = DEFAULT_RULES) -> Callable:
    """fn(params, tokens_BT, attention_mask=None) -> logits (B, T, V) float32, on `mesh`."""
    check_fits(cfg, mesh, impl)
    (params_sh, tokens_sh), logits_sh = forward_shardings(cfg, mesh, params, batch_size, rules)

    def fwd(params, tokens, attention_mask):
        return transformer.forward(cfg, params, tokens, attention_mask=attention_mask, impl=impl)

    jitted = jax.jit(fwd, in_shardings=(params_sh, tokens_sh, tokens_sh), out_shardings=logits_sh)
    def call(params, tokens, attention_mask=None):
        # Inputs go in as global arrays: jit places host arrays itself on one process but refuses
        # them across processes (`jax.distributed`), where every process passes the same values.
        mask = np.ones(np.shape(tokens), bool) if attention_mask is None else attention_mask
        return jitted(params, *jax.device_put((tokens, mask), tokens_sh))

    return on_mesh(mesh, call)


# ================================================================================ generate
def sharded_generate(cfg: ModelConfig, mesh: Mesh, params, batch_size: int, max_new_tokens: int, *,
                     impl: str = "auto", temperature: float = 0.0, top_p: float = 1.0,
                     rules: Sequence[Rule] = DEFAULT_RULES) -> Callable:
    """fn(params, prompts_BP, attention_mask_BP, rng=None, eos_id=-1, pad_id=0, masks=None) ->
    (B, max_new_tokens) int32, the KV cache split over batch x KV heads (`cache_axes`). Prompts are
    left-padded arrays; `masks` (pruning / trimming, as `model.generate` takes them) are replicated."""
    check_fits(cfg, mesh, impl)
    params_sh = tree_shardings(params, mesh, rules)
    batch_sh, rep = batch_sharding(mesh, batch_size), replicated(mesh)
    axes = cache_axes(cfg, mesh, batch_size)

    def gen(params, tokens, mask, rng, eos, pad, masks):
        return decode.generate_arrays(cfg, params, tokens, mask, rng, eos, pad, masks, max_new_tokens=max_new_tokens,
                                temperature=float(temperature), top_p=float(top_p), impl=impl, cache_axes=axes)

    jitted = jax.jit(gen, in_shardings=(params_sh, batch_sh, batch_sh, rep, rep, rep, rep), out_shardings=batch_sh)

    def call(params, prompts, attention_mask=None, rng=None, eos_id=-1, pad_id=0, masks=None):
        prompts = np.asarray(prompts, np.int32)
        mask = np.ones(prompts.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
        rng = jax.random.PRNGKey(0) if rng is None else rng
        return jitted(params, *jax.device_put((prompts, mask), batch_sh),
                      *jax.device_put((rng, jnp.int32(eos_id), jnp.int32(pad_id), masks), rep))

    return on_mesh(mesh, call)


# ================================================================================ scoring
def sharded_collect(cfg: ModelConfig, params, batches: Iterable, statistics: Sequence[str], mesh: Mesh, *,
                    micro_batch_size: int = 8, impl: str = "auto", rules: Sequence[Rule] = DEFAULT_RULES,
                    **collect_kwargs):
    """`scoring.collect` with params placed by `rules` and each micro-batch split over the batch axes.

    The step's outputs (sums over the micro-batch) come back replicated and accumulate on the host
    in float64 exactly as on one device.
    """
    check_fits(cfg, mesh, impl)
    params = jax.device_put(params, tree_shardings(params, mesh, rules))
    rows_sh = batch_sharding(mesh, micro_batch_size)
    with jax.set_mesh(mesh):
        return scoring.collect(cfg, params, batches, statistics, micro_batch_size=micro_batch_size, impl=impl,
                               place_batch=lambda rows: jax.device_put(rows, rows_sh), **collect_kwargs)


# ================================================================================ training
def train_state_shardings(state: TrainState, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> TrainState:
    """Params by `rules` (every leaf must match); optimizer moments by the same rules through their
    nested paths (".../mu/layer_0/..."), other optimizer leaves and step/rng replicated.
    (`moe_jax.training_step.sharded_train_step` runs the train step on these.)"""
    return TrainState(tree_shardings(state.params, mesh, rules), tree_shardings(state.opt_state, mesh, rules, False),
                      replicated(mesh), replicated(mesh))


def per_device_bytes(tree) -> int:
    """Bytes the largest device holds of `tree` (placed arrays): what sharding saved, measured."""
    per: dict[Any, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + math.prod(shard.data.shape) * leaf.dtype.itemsize
    return max(per.values(), default=0)


