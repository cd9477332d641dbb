"""Launcher flags shared by every experiments/*.py: multi-process start-up and the device mesh.

    python experiments/train.py ... --mesh=data=2,expert=4
    python experiments/prune.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

`initialize()` (one call at the top of each launcher's main) checks the flags before any device
work, calls `jax.distributed.initialize` when more than one process is asked for, and, with
--mesh, builds the mesh (`moe_jax.sharding.make_mesh`) and makes it the default (`jax.set_mesh`),
so impl="expert_parallel" and the `moe_jax.sharding` entry points find it. `place(cfg, params, mesh)`
(right after a launcher loads its model) puts the params on that mesh by the partition rules; plain
`jax.jit` code then runs sharded (GSPMD). Without flags nothing changes: one process, no mesh.
`start(argv)` is the opening every launcher's main shares (no stray arguments, `initialize`, INFO
logging); `model_path(config, repo)` is the checkpoint a launcher reads, and `load_compared` loads
and places it for the launchers that compare variants of it (fisher_moe, pathfinder, trimming).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
from absl import app, flags

from moe_jax import quality, sharding

flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_string("mesh", "", "Device mesh, e.g. 'data=2,expert=4' (axes data, fsdp, expert, tensor; one -1 "
                    "for the rest). Empty: no mesh.")

FLAGS = flags.FLAGS
log = logging.getLogger(__name__)


class LaunchError(ValueError):
    """Inconsistent launcher flags, with the flag and value named."""


def check_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """True when the flags ask for a multi-process run; raises LaunchError when they disagree."""
    if num_processes is None and process_id is None and coordinator_address is None:
        return False
    if num_processes is None or num_processes < 1:
        raise LaunchError(f"--num_processes={num_processes}: give the number of processes (>= 1) "
                          f"with --coordinator_address={coordinator_address} / --process_id={process_id}")
    if num_processes > 1 and not coordinator_address:
        raise LaunchError(f"--num_processes={num_processes} needs --coordinator_address=host:port (process 0's)")
    if coordinator_address and ":" not in coordinator_address:
        raise LaunchError(f"--coordinator_address={coordinator_address!r}: expected host:port")
    if process_id is None:
        raise LaunchError(f"--num_processes={num_processes} needs --process_id in [0, {num_processes})")
    if not 0 <= process_id < num_processes:
        raise LaunchError(f"--process_id={process_id} must lie in [0, num_processes={num_processes})")
    return num_processes > 1


def initialize(mesh_spec: str | None = None):
    """Apply the launcher flags; returns the mesh set as default, or None (see module docstring)."""
    spec = FLAGS.mesh if mesh_spec is None else mesh_spec
    try:  # bad flags fail here, before any device work, as a usage error naming the flag
        sizes = sharding.parse_mesh_spec(spec) if spec else None
        multi = check_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except (LaunchError, sharding.MeshError) as err:
        raise app.UsageError(str(err)) from None
    if multi:
        # CPU processes need a collectives backend to talk to each other (GPU/TPU bring their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if sizes is None:
        return None
    try:
        mesh = sharding.make_mesh(spec)
    except sharding.MeshError as err:
        raise app.UsageError(f"--mesh={spec}: {err}") from None
    jax.set_mesh(mesh)
    return mesh


def start(argv: list[str]):
    """The opening of a launcher's main: refuses positional arguments, applies the launcher flags
    (`initialize`) and logs at INFO; returns the mesh, or None."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    mesh = initialize()  # --mesh, --coordinator_address, --num_processes, --process_id
    logging.getLogger().setLevel(logging.INFO)
    return mesh


def model_path(config, repo: Path) -> Path:
    """The checkpoint a launcher reads: config.model_path, else config.checkpoint under the repository."""
    return Path(config.model_path).expanduser() if config.model_path else repo / config.checkpoint


def load_compared(config, repo: Path, mesh):
    """(path, cfg, params, tokenizer, measure, skills_on): the checkpoint at `model_path(config, repo)`
    with its tokenizer and quality columns (`quality.load_compared`), params placed on `mesh`; bad
    input is a usage error, raised before anything expensive runs."""
    path = model_path(config, repo)
    try:
        cfg, params, tokenizer, measure, skills_on = quality.load_compared(config, path, config.seed)
    except (FileNotFoundError, ValueError) as err:  # harness.HarnessError is a ValueError
        raise app.UsageError(str(err)) from None
    return path, cfg, place(cfg, params, mesh), tokenizer, measure, skills_on


def place(cfg, params, mesh):
    """`params` on `mesh` by the default partition rules (`sharding.shard_params`); unchanged when
    mesh is None. Logs one INFO summary: what each device holds, and what the rules could not split."""
    if mesh is None:
        return params
    placed = sharding.shard_params(params, mesh)
    unsplit = sharding.place_report(params, mesh)
    padding = sharding.expert_padding_report(cfg, mesh, itemsize=_itemsize(params))
    log.info("params placed on mesh %s: %.1f MiB on the fullest device; %d arrays kept whole on an axis their "
             "size does not divide%s; expert buckets not split over expert=%d: %s (+%.1f MiB per device)",
             dict(mesh.shape), sharding.entry.per_device_bytes(placed) / 2**20, len(unsplit),
             f" (first: {unsplit[0]})" if unsplit else "", padding["expert_axis"],
             padding["unsharded_buckets"] or "none", padding["replicated_bytes_per_device"] / 2**20)
    for line in unsplit:
        log.debug("%s", line)
    return placed


def _itemsize(params) -> int:
    """Bytes per element of the largest array (the experts' dtype, not a float32 norm scale's)."""
    import jax

    leaves = jax.tree_util.tree_leaves(params)
    return max(leaves, key=lambda a: a.size).dtype.itemsize if leaves else 4
