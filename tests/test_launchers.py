"""The absl launchers: refused settings, resumable progress. Their end-to-end smokes run as the stages of the
quick reproduction (tests/test_reproduce.py), which runs every launcher at smoke size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from moe_jax import reporting

REPO = Path(__file__).resolve().parents[1]


def _launch(script: str, config: str, workdir: Path, *overrides: str, timeout: int = 600):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(REPO / "experiments" / script), f"--config={REPO / 'configs' / config}",
                           f"--workdir={workdir}", *overrides], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env)


def test_prune_launcher_rejects_unknown_methods(tmp_path):
    result = _launch("prune.py", "prune.py", tmp_path, "--config.methods=(('fishr', 0.5),)")
    assert result.returncode != 0 and "'fishr' is not available" in result.stderr
    result = _launch("prune.py", "prune.py", tmp_path, "--config.methods=(('fisher:model', 0.5),)")
    assert result.returncode != 0 and "scope 'model'" in result.stderr
    result = _launch("prune.py", "prune.py", tmp_path, "--config.methods=(('pathfinder:layer', 0.5),)")
    assert result.returncode != 0 and "scope 'layer'" in result.stderr
    result = _launch("prune.py", "prune.py", tmp_path, "--config.methods=(('fisher', 1.5),)")
    assert result.returncode != 0 and "must lie in (0, 1)" in result.stderr
    assert not list(tmp_path.iterdir())


def test_resumable_runs_keep_finished_work_and_drop_foreign_work(tmp_path):
    runs = reporting.ResumableRuns(tmp_path / "progress.json", {"config": 1})
    runs.put("a", {"mean_em": 0.5})
    again = reporting.ResumableRuns(tmp_path / "progress.json", {"config": 1})
    assert again.get("a") == {"mean_em": 0.5} and again.get("b") is None
    other = reporting.ResumableRuns(tmp_path / "progress.json", {"config": 2})  # other settings: start over
    assert other.get("a") is None
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporaries left


def test_prune_reuses_scores_only_for_the_same_weights(tmp_path, capsys):
    """WORKDIR/scores.npz is reused for the same model and refused for one whose experts changed
    under unchanged routers (what trimming's frozen-router rule leaves after further training)."""
    import jax
    import numpy as np

    from configs import prune as prune_config
    from experiments import prune  # the function main() calls, in-process
    from moe_jax import scoring
    from moe_jax.data.tokenizer import ByteTokenizer
    from tests.conftest import scaled_params, tiny_config

    tok = ByteTokenizer()
    cfg = tiny_config("qwen2_moe", vocab_size=tok.vocab_size)
    params = scaled_params(cfg)
    config = prune_config.get_config()
    config.calibration.update(data="skills:train", n_per_domain=1, seq_len=120, batch_size=4, micro_batch_size=4)

    def calibrate(p):
        capsys.readouterr()
        scores = prune.calibrate(cfg, p, tok, config, ["fisher"], tmp_path, scoring.model_digest(cfg, p))
        return scores, "Using the scores" in capsys.readouterr().out

    first, reused = calibrate(params)
    assert not reused and (tmp_path / "scores.npz").exists()
    again, reused = calibrate(jax.tree.map(np.array, params))  # same weights, other arrays
    assert reused and np.array_equal(again["fisher"]["layer_0"], first["fisher"]["layer_0"])
    retrained = jax.tree.map(np.array, params)
    retrained["layer_0"]["moe"]["experts"]["bucket_0"]["up"][3] *= 1.5  # one expert, router untouched
    assert np.array_equal(retrained["layer_0"]["moe"]["router"]["kernel"], params["layer_0"]["moe"]["router"]["kernel"])
    fresh, reused = calibrate(retrained)
    assert not reused and not np.allclose(fresh["fisher"]["layer_0"], first["fisher"]["layer_0"])
    np.testing.assert_allclose(fresh["fisher"]["layer_0"],
                               scoring.Scores.load(tmp_path / "scores.npz")["fisher"]["layer_0"])
