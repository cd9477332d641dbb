"""Two processes under `jax.distributed` (2 CPU devices each, gloo collectives): the launchers' path.

Each process parses the launcher flags (--coordinator_address, --num_processes, --process_id,
--mesh=data=2,expert=2), so `launch.initialize` starts the distributed runtime and a 4-device mesh
that spans both processes, then `launch.place` shards the params across them. Sharded forward,
greedy generation with the KV cache, Fisher scoring and `hf.save_pretrained` (shards gathered
across hosts, process 0 writes) must equal the single-device results. The processes run as
subprocesses of this test, so the rest of the suite keeps its one device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _worker(process_id: int, port: int, out_dir: str) -> dict:
    from absl import flags

    from moe_jax import launch

    flags.FLAGS([sys.argv[0], f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 f"--process_id={process_id}", "--mesh=data=2,expert=2"])
    mesh = launch.initialize()  # jax.distributed.initialize + the default mesh

    import jax
    from jax.experimental import multihost_utils

    from moe_jax import hf, model, scoring, sharding
    from tests.conftest import scaled_params, tiny_config

    jax.config.update("jax_default_matmul_precision", "highest")
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    cfg = tiny_config("qwen2_moe", num_layers=1, dense_layers=(), num_experts=4)
    params = jax.tree.map(np.asarray, scaled_params(cfg))  # same values in both processes (seeded numpy)
    rng = np.random.default_rng(0)
    B = 4
    tokens = rng.integers(1, cfg.vocab_size, (B, 10)).astype(np.int32)
    calib = [{"tokens": rng.integers(1, cfg.vocab_size, (4, 9)).astype(np.int32),
              "segment_ids": np.ones((4, 9), np.int32)}]

    placed = launch.place(cfg, params, mesh)
    up = placed["layer_0"]["moe"]["experts"]["bucket_0"]["up"]
    assert not up.is_fully_addressable  # the experts really are split across the processes

    def gathered(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    errors = {}
    want = np.asarray(model.forward(cfg, params, tokens, impl="dense"))  # this process's own device
    got = sharding.sharded_forward(cfg, mesh, placed, B, impl="expert_parallel")(placed, tokens)
    errors["forward"] = float(np.max(np.abs(gathered(got) - want)))

    want_ids = np.asarray(model.generate(cfg, params, tokens[:, :5], 4, impl="dense"))
    got_ids = sharding.sharded_generate(cfg, mesh, placed, B, 4, impl="expert_parallel")(placed, tokens[:, :5])
    errors["generate_mismatches"] = int(np.sum(gathered(got_ids) != want_ids))

    want_f = scoring.collect(cfg, params, calib, ("fisher",), micro_batch_size=4, progress=False, impl="dense")
    got_f = sharding.sharded_collect(cfg, params, calib, ("fisher",), mesh, micro_batch_size=4, progress=False,
                                     impl="expert_parallel")
    ref = want_f["fisher"]["layer_0"]
    errors["fisher_rel"] = float(np.max(np.abs(got_f["fisher"]["layer_0"] - ref)) / np.max(np.abs(ref)))

    hf.save_pretrained(cfg, placed, out_dir, overwrite=True)  # a collective: every process calls it
    multihost_utils.sync_global_devices("saved")
    if process_id == 0:
        _, loaded = hf.load_pretrained(out_dir, dtype="float32")
        errors["saved"] = max(float(np.max(np.abs(np.asarray(a) - b)))
                              for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
    return errors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = [str(port), str(tmp / "export")]
    procs = [subprocess.Popen([sys.executable, __file__, str(i), *args, str(tmp / f"{i}.json")],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two-process run did not finish in 10 minutes")
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
    return [json.loads((tmp / f"{i}.json").read_text()) for i in range(2)]


def test_two_processes_match_one_device(results):
    for errors in results:  # each process checks the gathered outputs
        assert errors["forward"] < TOL, errors
        assert errors["generate_mismatches"] == 0, errors
        assert errors["fisher_rel"] < TOL, errors
    assert results[0]["saved"] == 0.0  # process 0 wrote every shard, bit for bit


if __name__ == "__main__":
    pid, port, out, result = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    Path(result).write_text(json.dumps(_worker(pid, port, out)))
