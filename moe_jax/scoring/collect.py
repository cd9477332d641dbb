"""One jit-compiled pass over calibration batches that accumulates many statistics at once.

Each micro-batch runs one forward and, when a gradient statistic is asked for, one backward
with respect to a per-sequence dims mask (ones, shape (B, E, F_max) per MoE layer): the
gradient of the summed per-sequence losses with respect to sequence s's mask *is* dL_s/dm,
so the per-sample Fisher of every routed-expert dim comes out of a single backward pass. The
model weights get no gradient. Activation and routing sums come from the same forward.

Sums accumulate on the host in float64. With ``checkpoint_path`` the accumulators and the
number of batches done are saved atomically every ``checkpoint_every`` batches; a killed run
started again with the same arguments skips the batches it has and ends with the same scores.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax import multihost
from moe_jax.config import ModelConfig
from moe_jax.model import transformer
from moe_jax.reporting import atomic_write
from moe_jax.scoring import trajectory
from moe_jax.scoring.statistics import (
    DIM_STATISTICS,
    STATISTICS,
    Scores,
    ScoringError,
    magnitude,
    random_scores,
)

log = logging.getLogger(__name__)

Params = dict[str, Any]
Batch = Mapping[str, np.ndarray] | np.ndarray
GRAD_STATS = ("fisher", "grad_abs")
ACT_STATS = ("activation", "router_weighted", "routing")
TRAJ_STATS = ("trajectory", "recon_dense")
_STATE_VERSION = 1


# ============================================================================ batches
def calibration_rows(batch: Batch) -> dict[str, np.ndarray]:
    """A batch as next-token rows: inputs (B, T), targets, loss weights, segment ids.

    Accepts the pipeline's dicts ({"tokens", "loss_mask"?, "segment_ids"?}) or a plain (B, T+1)
    token array (every token real, loss on all of them). Row t predicts token t+1; a token is
    real where its segment id is > 0 (absent: all real).
    """
    if not isinstance(batch, Mapping):
        batch = {"tokens": np.asarray(batch)}
    if "tokens" not in batch:
        raise ScoringError(f"calibration batch has keys {sorted(batch)}; expected 'tokens' "
                           "(and optionally 'loss_mask', 'segment_ids')")
    tokens = np.asarray(batch["tokens"])
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ScoringError(f"calibration batch 'tokens' has shape {tokens.shape}; expected (batch, length >= 2)")
    seg = np.asarray(batch.get("segment_ids", np.ones_like(tokens)), np.int32)
    if "loss_mask" in batch:
        weights = np.asarray(batch["loss_mask"], np.float32)
    elif "attention_mask" in batch:
        weights = np.asarray(batch["attention_mask"], np.float32)
        seg = np.where(weights > 0, seg, 0).astype(np.int32)
    else:
        weights = (seg > 0).astype(np.float32)
    # A target counts only inside its own segment (not across a packed boundary).
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "weights": (weights[:, 1:] * same).astype(np.float32), "segment_ids": seg[:, :-1]}


def micro_batches(rows: dict[str, np.ndarray], size: int) -> Iterable[dict[str, np.ndarray]]:
    """Slices of `size` rows; the last one padded with empty rows (they count nothing)."""
    n = len(rows["inputs"])
    for start in range(0, n, size):
        chunk = {k: v[start:start + size] for k, v in rows.items()}
        pad = size - len(chunk["inputs"])
        if pad:
            chunk = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
        yield chunk


# ============================================================================ the step
def _ones_masks(cfg: ModelConfig, batch_size: int) -> dict[str, dict[str, jax.Array]]:
    return {cfg.layer_name(i): {"dims": jnp.ones((batch_size, cfg.experts_per_layer[i], cfg.max_width(i)),
                                                 jnp.float32)}
            for i in cfg.moe_layers}


@functools.partial(jax.jit, static_argnames=("cfg", "want_grad", "want_acts", "want_traj", "want_dense", "impl"))
def score_step(cfg: ModelConfig, params: Params, rows, *, want_grad: bool, want_acts: bool, impl: str,
                want_traj: bool = False, want_dense: bool = False):
    """Sums over one micro-batch: {stat: {layer: array}}, token and sequence counts, and
    per-sequence arrays {stat: {layer: (B, E)}} (trajectory statistics only)."""
    B = rows["inputs"].shape[0]
    capture = (("activations", "routing") if want_acts else ()) + (trajectory.captures(impl) if want_traj else ())
    capture = tuple(dict.fromkeys(capture))
    token_weight_B = rows["weights"].sum(-1)

    def loss(masks):
        out = transformer.forward(cfg, params, rows["inputs"], masks if want_grad else None,
                                  segment_ids=rows["segment_ids"], capture=capture, impl=impl)
        logits, aux = out if capture else (out, {})
        ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits, rows["targets"])
        # L = sum_s L_s with L_s the mean loss of sequence s, so dL/dm_s = dL_s/dm.
        per_seq_B = (ce_BT * rows["weights"]).sum(-1) / jnp.maximum(token_weight_B, 1.0)
        return per_seq_B.sum(), aux

    masks = _ones_masks(cfg, B) if want_grad else None
    if want_grad:
        grads, aux = jax.grad(loss, has_aux=True)(masks)
    else:
        _, aux = loss(masks)
    sums: dict[str, dict[str, jax.Array]] = {}
    valid_BT = rows["segment_ids"] > 0
    for i in cfg.moe_layers:
        name = cfg.layer_name(i)
        if want_grad:
            g_BEF = grads[name]["dims"]
            sums.setdefault("fisher_sum", {})[name] = jnp.sum(g_BEF**2, axis=0)
            sums.setdefault("grad_abs_sum", {})[name] = jnp.sum(jnp.abs(g_BEF), axis=0)
        if want_acts:
            a = aux[name]
            sums.setdefault("act_abs_sum", {})[name] = a["act_abs_sum"]
            sums.setdefault("act_weighted_abs_sum", {})[name] = a["act_weighted_abs_sum"]
            sums.setdefault("count", {})[name] = a["count"]
            sums.setdefault("weighted_out_norm_sum", {})[name] = a["weighted_out_norm_sum"]
            sums.setdefault("prob_mass", {})[name] = jnp.sum(a["scores_TE"] * valid_BT[..., None], axis=(0, 1))
    per_seq: dict[str, dict[str, jax.Array]] = {}
    if want_traj:
        layers = list(cfg.moe_layers)
        for n, i in enumerate(layers):
            name = cfg.layer_name(i)
            layer_sums, seq = trajectory.layer_trajectory(cfg, params, i, aux[name], valid_BT, dense=want_dense,
                                                          impl=impl)
            for k, v in layer_sums.items():
                sums.setdefault(k, {})[name] = v
            for k, v in seq.items():
                per_seq.setdefault(k, {})[name] = v
            sums.setdefault("count_traj", {})[name] = seq["seq_count"].sum(0)
            if n + 1 < len(layers):
                nxt = cfg.layer_name(layers[n + 1])
                sums.setdefault("transitions", {})[name] = trajectory.transitions(
                    aux[name]["idx_TK"], aux[nxt]["idx_TK"], valid_BT, cfg.experts_per_layer[i],
                    cfg.experts_per_layer[layers[n + 1]])
            per_seq.setdefault("moe_input", {})[name] = aux[name]["x"]
    counts = {"tokens": valid_BT.sum(), "sequences": (token_weight_B > 0).sum(), "valid_BT": valid_BT}
    return sums, counts, per_seq


# ============================================================================ state
class ScoreState:
    """Host accumulators (float64) and progress; saved and restored as one .npz."""

    def __init__(self, fingerprint: str, sample_cap: int = 0):
        self.fingerprint, self.sample_cap = fingerprint, sample_cap
        self.batches_done = 0
        self.num_tokens = 0
        self.num_sequences = 0
        self.sums: dict[str, dict[str, np.ndarray]] = {}
        self.rows: dict[str, dict[str, np.ndarray]] = {}  # per-sequence (S, E) arrays, and the input sample
        self.sample_tokens = 0

    def add(self, sums, counts, per_seq=None) -> None:
        sums, counts, per_seq = multihost.device_get((sums, counts, per_seq or {}))
        for stat, per_layer in sums.items():
            acc = self.sums.setdefault(stat, {})
            for layer, arr in per_layer.items():
                acc[layer] = acc.get(layer, 0.0) + np.asarray(arr, np.float64)
        self.num_tokens += int(counts["tokens"])
        self.num_sequences += int(counts["sequences"])
        real_B = np.asarray(counts["valid_BT"]).any(-1)  # padding rows of a short micro-batch carry nothing
        valid = np.asarray(counts["valid_BT"]).reshape(-1)
        for stat, per_layer in per_seq.items():
            acc = self.rows.setdefault(stat, {})
            for layer, arr in per_layer.items():
                if stat == "moe_input":  # a sample of real-token inputs, for NAEE's subset search
                    have = len(acc.get(layer, ()))
                    flat = np.asarray(arr, np.float32).reshape(-1, arr.shape[-1])[valid]
                    take = flat[:max(0, self.sample_cap - have)]
                    acc[layer] = np.concatenate([acc[layer], take]) if layer in acc else take
                else:
                    new = np.asarray(arr, np.float64)[real_B]
                    acc[layer] = np.concatenate([acc[layer], new]) if layer in acc else new

    def save(self, path: Path) -> None:
        arrays = {f"{s}/{lyr}": a for s, per in self.sums.items() for lyr, a in per.items()}
        arrays.update({f"rows:{s}/{lyr}": a for s, per in self.rows.items() for lyr, a in per.items()})
        header = {"version": _STATE_VERSION, "fingerprint": self.fingerprint, "batches_done": self.batches_done,
                  "num_tokens": self.num_tokens, "num_sequences": self.num_sequences}
        arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(path, buf.getvalue())

    @classmethod
    def restore(cls, path: Path, fingerprint: str, sample_cap: int = 0) -> ScoreState:
        try:
            with np.load(path) as z:
                header = json.loads(bytes(z["__header__"]).decode())
                arrays = {k: z[k] for k in z.files if k != "__header__"}
        except (OSError, ValueError, KeyError) as err:
            raise ScoringError(f"{path}: unreadable scoring checkpoint ({err}); delete it to start over") from err
        if header.get("fingerprint") != fingerprint:
            raise ScoringError(f"{path}: this scoring checkpoint belongs to another run (different model, "
                               "statistics or settings); delete it or choose another checkpoint_path")
        state = cls(fingerprint, sample_cap)
        state.batches_done, state.num_tokens = header["batches_done"], header["num_tokens"]
        state.num_sequences = header["num_sequences"]
        for key, arr in arrays.items():
            stat, layer = key.split("/", 1)
            if stat.startswith("rows:"):
                state.rows.setdefault(stat[5:], {})[layer] = arr
            else:
                state.sums.setdefault(stat, {})[layer] = arr
        return state


_DIGEST_SAMPLES = 4096  # elements sampled per tensor; the leading (expert) axis is sampled first


def _sample_strides(shape: tuple[int, ...], budget: int = _DIGEST_SAMPLES) -> tuple[int, ...]:
    """Per-axis strides that pick at most ~`budget` elements of a tensor: up to 256 along the
    leading axis (every expert of a bucket, so a retrained expert is seen), the rest spread evenly."""
    strides = []
    for axis, size in enumerate(shape):
        axes_left = len(shape) - axis
        count = min(size, 256, budget) if axis == 0 and axes_left > 1 else min(
            size, max(1, round(budget ** (1 / axes_left))))
        budget = max(1, budget // count)
        strides.append(-(-size // count))
    return tuple(strides)


@jax.jit
def _strided_samples(params: Params) -> Params:
    return jax.tree.map(lambda x: x[tuple(slice(None, None, s) for s in _sample_strides(x.shape))], params)


def model_digest(cfg: ModelConfig, params: Params) -> str:
    """The config and a strided sample of every tensor's bytes (with its path, shape and dtype):
    cheap at any size, and different when any weight matrix changes as training changes it, so
    cached scores are reused only for the same weights (experts retrained under frozen routers
    included). Exact bytes, so the digest does not depend on how the params are sharded."""
    h = hashlib.blake2b(cfg.to_json().encode(), digest_size=8)
    shapes = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    samples = {jax.tree_util.keystr(p): np.ascontiguousarray(x) for p, x in
               jax.tree_util.tree_leaves_with_path(multihost.device_get(_strided_samples(params)))}
    for name in sorted(samples):
        h.update(f"{name}{shapes[name]}{samples[name].dtype}".encode())
        h.update(samples[name].tobytes())
    return h.hexdigest()


def _fingerprint(cfg: ModelConfig, params: Params, statistics: Sequence[str], micro_batch_size: int,
                 seed: int, data_id: str) -> str:
    key = json.dumps([model_digest(cfg, params), list(statistics), micro_batch_size, seed, data_id])
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


# ============================================================================ collect
def collect(cfg: ModelConfig, params: Params, batches: Iterable[Batch], statistics: Sequence[str] = ("fisher",),
            *, micro_batch_size: int = 8, seed: int = 0, impl: str = "auto",
            checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int = 20,
            data_id: str = "", progress: bool = True, total: int | None = None,
            sample_tokens: int = 256, place_batch: Callable[[dict], Any] | None = None) -> Scores:
    """Accumulate `statistics` (any of `STATISTICS`) over `batches` and return `Scores`.

    batches: an iterable of pipeline batch dicts or (B, T+1) token arrays, the same sequence
    on every call if a run is to resume. micro_batch_size: rows per compiled step (the last
    micro-batch is padded with empty rows; with "trajectory" a step also holds every MoE layer's
    per-choice expert outputs, micro_batch_size * T * top_k * hidden floats per layer, which the
    routed reconstruction error reuses). checkpoint_path: an .npz to save progress to and
    resume from; it is refused if the model, statistics, settings or `data_id` (any string that
    names the calibration data) differ from the run that wrote it. sample_tokens: MoE inputs kept
    per layer for NAEE's subset search ("trajectory" only). place_batch: puts each micro-batch of
    rows on devices (`moe_jax.sharding.sharded_collect` splits it over the mesh's batch axes).
    """
    statistics = tuple(dict.fromkeys(statistics))
    unknown = sorted(set(statistics) - set(STATISTICS))
    if unknown or not statistics:
        raise ScoringError(f"statistics {list(statistics)}: unknown {unknown}; expected some of {list(STATISTICS)}")
    if micro_batch_size < 1:
        raise ScoringError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not cfg.moe_layers:
        raise ScoringError(f"model {cfg.model_type} has no MoE layers to score")
    want_grad = any(s in statistics for s in GRAD_STATS)
    want_acts = any(s in statistics for s in ACT_STATS)
    want_traj = any(s in statistics for s in TRAJ_STATS)
    want_dense = "recon_dense" in statistics
    fingerprint = _fingerprint(cfg, params, statistics, micro_batch_size, seed, data_id)
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    cap = sample_tokens if want_traj else 0
    state = ScoreState.restore(ckpt, fingerprint, cap) if ckpt and ckpt.exists() else ScoreState(fingerprint, cap)
    if state.batches_done:
        log.info("scoring: resuming from %s after %d batches", ckpt, state.batches_done)

    if want_grad or want_acts or want_traj:
        bar = progress_bar(total, state.batches_done, progress)
        for index, batch in enumerate(batches):
            if index < state.batches_done:
                continue
            for chunk in micro_batches(calibration_rows(batch), micro_batch_size):
                chunk = chunk if place_batch is None else place_batch(chunk)
                state.add(*score_step(cfg, params, chunk, want_grad=want_grad, want_acts=want_acts, impl=impl,
                                       want_traj=want_traj, want_dense=want_dense))
            state.batches_done = index + 1
            bar.update(1)
            if ckpt and state.batches_done % checkpoint_every == 0:
                state.save(ckpt)
        bar.close()
        if ckpt:
            state.save(ckpt)
        if state.num_tokens == 0 or (want_grad and state.num_sequences == 0):
            raise ScoringError("no calibration tokens: the batches were empty or every loss weight was 0 "
                               f"({state.batches_done} batches seen); give batches with real tokens")
    return finish_scores(cfg, params, state, statistics, seed)


def progress_bar(total, initial, enabled):
    """The scoring progress bar (tqdm), shown only when `enabled`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="scoring", unit="batch", disable=not enabled)


def finish_scores(cfg: ModelConfig, params: Params, state: ScoreState, statistics: Sequence[str], seed: int) -> Scores:
    """`Scores` from the accumulated sums of `state` (shared by `collect` and `collect_layerwise`)."""
    widths = {cfg.layer_name(i): tuple(cfg.expert_widths[i]) for i in cfg.moe_layers}
    real = {cfg.layer_name(i): np.arange(cfg.max_width(i))[None, :] < np.array(cfg.expert_widths[i])[:, None]
            for i in cfg.moe_layers}
    sums, values = state.sums, {}

    def per_dim(stat, fn):
        values[stat] = {lyr: np.where(real[lyr], fn(lyr), np.nan) for lyr in widths}

    def mean_over_routed(key):
        return lambda lyr: sums[key][lyr] / np.maximum(sums["count"][lyr], 1.0)[:, None]

    if "fisher" in statistics:
        per_dim("fisher", lambda lyr: sums["fisher_sum"][lyr])
    if "grad_abs" in statistics:
        per_dim("grad_abs", lambda lyr: sums["grad_abs_sum"][lyr] / max(state.num_sequences, 1))
    if "activation" in statistics:
        per_dim("activation", mean_over_routed("act_abs_sum"))
    if "router_weighted" in statistics:
        per_dim("router_weighted", mean_over_routed("act_weighted_abs_sum"))
    if "magnitude" in statistics:
        values["magnitude"] = magnitude(cfg, params)
    if "random" in statistics:
        values["random"] = random_scores(cfg, seed)
    if "routing" in statistics:
        values["expert_count"] = {lyr: sums["count"][lyr] for lyr in widths}
        values["expert_prob_mass"] = {lyr: sums["prob_mass"][lyr] for lyr in widths}
        values["expert_reap"] = {lyr: sums["weighted_out_norm_sum"][lyr] / np.maximum(sums["count"][lyr], 1.0)
                                 for lyr in widths}
    if any(s in statistics for s in TRAJ_STATS):
        count = {lyr: np.maximum(sums["count_traj"][lyr], 1.0) for lyr in widths}
        values["expert_recon_routed"] = {lyr: sums["recon_routed_sum"][lyr] / count[lyr] for lyr in widths}
        values["transitions"] = dict(sums.get("transitions", {}))
        for stat in ("seq_count", "seq_prob_mass", "seq_strength", "seq_recon_routed"):
            values[stat] = dict(state.rows[stat])
        values["moe_input_sample"] = dict(state.rows["moe_input"])
    if "recon_dense" in statistics:
        values["expert_recon_dense"] = {lyr: sums["recon_dense_sum"][lyr] / max(state.num_tokens, 1) for lyr in widths}
    scores = Scores(values, widths, state.num_sequences, state.num_tokens,
                    {"statistics": list(statistics), "seed": seed, "batches": state.batches_done})
    scores.check_finite()
    return scores


__all__ = ["collect", "calibration_rows", "Scores", "ScoringError", "STATISTICS", "DIM_STATISTICS"]
