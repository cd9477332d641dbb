"""Load an ml_collections config file (configs/*.py) outside absl's --config flag.

For code that needs a config's values without parsing flags: the reproduction's stage
fingerprints, configs built on another config (configs/fisher_moe.py, the paper configs) and a
launcher that trains with a config named in its own config.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections


def load(path: str | Path, preset: str | None = None) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(preset)`) of the config file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {str(path)!r}")
    spec = importlib.util.spec_from_file_location(f"_moe_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()
