"""The Colab notebooks, executed top to bottom on CPU with small settings, and stored without outputs.

Executed with nbclient + ipykernel (the Jupyter project's own executor, what papermill and
nbconvert use): a real kernel runs the cells in order, as Colab does, and magics, display()
and rich outputs behave as there. Each notebook reads its knobs from one cell tagged
"parameters" (a dict SETTINGS); the test inserts `SETTINGS.update(...)` after it, refusing keys
the notebook does not have, and appends a cell that prints what the test checks as JSON.
The kernels inherit this session's JAX compilation cache (conftest.py) and its fast-compile XLA flags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import random_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
BUILT_IN = REPO / "checkpoints" / "testbed"


def test_notebooks_exist_and_are_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_hf_checkpoint.ipynb", "03_router_audit.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
        assert not dirty, f"{path.name}: code cells {dirty} hold outputs or execution counts; strip them"
        settings = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(settings) == 1 and settings[0].source.startswith("SETTINGS = dict("), path.name
        assert "find_spec(\"moe_jax\") is None" in code[0].source, f"{path.name}: the install cell comes first"


def execute(path: Path, overrides: dict, report: str, tmp_path: Path, monkeypatch) -> dict:
    """Run the notebook with SETTINGS.update(overrides) after its settings cell; returns the JSON
    that the appended `report` cell prints."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        f"_overrides = {overrides!r}\n"
        "assert not set(_overrides) - set(SETTINGS), f'unknown settings {set(_overrides) - set(SETTINGS)}'\n"
        "SETTINGS.update(_overrides)"))
    nb.cells.append(nbformat.v4.new_code_cell(f"import json as _json\nprint('REPORT' + _json.dumps({report}))"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    return {**json.loads(text.split("REPORT", 1)[1]), "_images": images}


@pytest.mark.skipif(not (BUILT_IN / "config.json").exists(), reason="no committed model")
def test_quickstart_notebook(tmp_path, monkeypatch):
    got = execute(REPO / "colab" / "01_quickstart.ipynb",
                  {"calibration_rows": 8, "eval_per_domain": 2, "workdir": str(tmp_path)},
                  '{"removed": plan.dims_removed_fraction(), "bytes": [size["bytes"], pruned_size["bytes"]], '
                  '"before": {d: v["exact_match"] for d, v in before["exact_match"].items()}, '
                  '"after": {d: v["n"] for d, v in after["exact_match"].items()}, "model": str(model_dir)}',
                  tmp_path, monkeypatch)
    assert got["model"] == str(BUILT_IN)
    assert abs(got["removed"] - 0.5) < 0.01 and got["bytes"][1] < got["bytes"][0]
    assert set(got["before"]) == {"arithmetic", "facts", "code", "language", "safety"}
    assert all(0.0 <= v <= 1.0 for v in got["before"].values()) and set(got["after"].values()) == {2}
    assert got["_images"] == 3  # the Fisher plots, the accuracy bars, the expert-load heatmap


def _tiny_tokenizer(path: Path, texts: list[str]) -> None:
    """A BPE tokenizer.json of <= 96 ids (the tiny checkpoint's vocabulary), trained on `texts`."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=96, special_tokens=["<|endoftext|>", "[UNK]"],
                                             limit_alphabet=60)
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() <= 96
    tok.save(str(path / "tokenizer.json"))


def test_hf_checkpoint_notebook(tmp_path, monkeypatch):
    from moe_jax.data import skills

    ckpt = random_hf_checkpoint(tmp_path / "ckpt")
    texts = [ex.text.lower() for ex in skills.train_mixture(20, seed=0)]
    _tiny_tokenizer(ckpt, texts)
    (tmp_path / "calib.txt").write_text("\n".join(texts[: len(texts) // 2]) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(texts[len(texts) // 2:]) + "\n")
    out = tmp_path / "pruned"
    got = execute(REPO / "colab" / "02_hf_checkpoint.ipynb",
                  {"model": str(ckpt), "dtype": "float32", "calibration": f"text:{tmp_path / 'calib.txt'}",
                   "evaluation": f"text:{tmp_path / 'eval.txt'}", "seq_len": 32, "calibration_rows": 8,
                   "eval_rows": 4, "batch_size": 4, "out_dir": str(out)},
                  '{"ppl": ppl, "experts": {k: [n for n in c.experts_per_layer if n] for k, (c, p) in pruned.items()}, '
                  '"removed": plans["fisher"].dims_removed_fraction()}', tmp_path, monkeypatch)
    assert set(got["ppl"]) == {"unpruned", "fisher", "pathfinder"}
    assert all(1.0 < v < 1e4 for v in got["ppl"].values())  # finite perplexities of a 96-id vocabulary
    assert abs(got["removed"] - 0.5) < 0.02
    assert sum(got["experts"]["pathfinder"]) == 12  # 2 MoE layers x 8 experts, 25% removed
    from moe_jax import hf

    for name in ("fisher", "pathfinder"):
        assert (out / name / "tokenizer.json").is_file()
        cfg, _ = hf.load_pretrained(out / name, dtype="float32")
        assert [n for n in cfg.experts_per_layer if n] == got["experts"][name]


@pytest.mark.skipif(not (BUILT_IN / "config.json").exists(), reason="no committed model")
def test_router_audit_notebook(tmp_path, monkeypatch):
    got = execute(REPO / "colab" / "03_router_audit.ipynb",
                  {"n_safety": 4, "n_attack": 1, "max_queries": 16, "monitor_per_domain": 2,
                   "calibration_rows": 8, "calibration_per_domain": 2},
                  '{"audit": {k: v for k, v in report.items() if k != "routing"}, "forced": forced.summary(), '
                  '"rates": rates, "rows": rows, "critical": critical.keep_experts()}', tmp_path, monkeypatch)
    assert 0.0 <= got["audit"]["refusal_rate"] <= 1.0 and got["forced"]["queries"] <= 16
    assert 0.0 <= got["rates"]["tpr"] <= 1.0 and got["rates"]["calibration_fpr"] <= 0.05 + 1e-9
    assert got["rows"]["safety-aware"]["critical experts removed"] == 0
    assert any(got["critical"].values())
