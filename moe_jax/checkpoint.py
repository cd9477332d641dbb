"""Training state on disk: orbax checkpoints that resume bit-for-bit, metrics logs, atomic files.

`TrainState` is everything that changes while training; `save_checkpoint` / `restore_checkpoint`
write and read it with orbax's atomic step directories (a corrupted or mismatched checkpoint is
a `TrainError` naming its path and the first differing parameter); `MetricsLog` appends JSON
lines and mirrors scalars to TensorBoard, dropping records past the step a run resumes from.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from moe_jax.reporting import atomic_write


class TrainError(ValueError):
    """A config value, workdir or checkpoint the trainer cannot use; the message names it."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; with the step it fixes all that follows."""

    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    rng: jax.Array  # uint32[2] PRNG key (the loop folds in the step; nothing stochastic uses it yet)

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "opt_state": self.opt_state, "step": self.step, "rng": self.rng}


# ============================================================================== files
def check_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-") as probe:
            probe.write(b"ok")
    except OSError as err:
        raise TrainError(f"workdir {str(workdir)!r} is not a writable directory: {err}") from err


def summary_writer_class():
    """tensorboardX.SummaryWriter, imported without torch when torch is not loaded yet:
    tensorboardX tries an optional ``import torch`` that costs ~10 s and is not needed here."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes the optional import fail at once
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _step_of(line: str) -> float:
    """Step of a metrics.jsonl line; a line cut short by a kill counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """Appends one JSON line per record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: Path, resume_step: int):
        self.path = workdir / "metrics.jsonl"
        if self.path.exists():  # drop records past the checkpoint we resume from: they are redone
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            atomic_write(self.path, "".join(line + "\n" for line in kept))
        purge = resume_step + 1 if resume_step else None
        self.tb = summary_writer_class()(str(workdir / "tb"), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            self.tb.add_scalar(key, float(value), int(step))

    def close(self) -> None:
        self.tb.close()


# ============================================================================== checkpoints
def checkpoint_manager(workdir: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                                 item_names=("state", "meta"))


def save_checkpoint(manager, state: TrainState, meta: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    step = int(state.step)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state.as_dict()),
                                                 meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()


def param_shapes(params) -> dict[str, list[int]]:
    """{"layer_0/attn/q_proj/kernel": [D, H*hd], ...}: what a checkpoint must match to be restored."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): list(x.shape) for path, x in leaves}


def restore_checkpoint(manager, step: int, target: TrainState) -> tuple[TrainState, dict]:
    """The state saved at `step` (structure and shapes from `target`); errors name the path."""
    import orbax.checkpoint as ocp

    path = Path(manager.directory) / str(step)

    def unreadable(err: Exception) -> TrainError:
        return TrainError(f"checkpoint {path} is corrupted or incompatible and cannot be restored "
                          f"({type(err).__name__}: {str(err)[:300]}); delete it to resume from an earlier "
                          f"one, or use a fresh workdir")

    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
    except Exception as err:  # orbax/tensorstore raise many types; all mean "unreadable"
        raise unreadable(err) from err
    saved, expected = meta.get("param_shapes"), param_shapes(target.params)
    if saved is not None and saved != expected:
        key = next(k for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k))
        raise TrainError(f"checkpoint {path} holds params of other shapes than config.model describes "
                         f"(first difference: {key}: checkpoint {saved.get(key)}, "
                         f"config {expected.get(key)}); "
                         f"use a fresh workdir or the config it was trained with")
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target.as_dict())
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as err:
        raise unreadable(err) from err
    # Through host memory: orbax returns device-committed arrays, which would make jit compile
    # the train step again for what is the same computation as on freshly initialised arrays.
    s = jax.tree_util.tree_map(jnp.asarray, jax.device_get(restored["state"]))
    state = TrainState(s["params"], s["opt_state"], jnp.asarray(s["step"], jnp.int32), s["rng"])
    if int(state.step) != step:
        raise TrainError(f"checkpoint {path} holds step {int(state.step)}, not {step}")
    return state, meta


