"""Hugging Face safetensors checkpoints <-> (ModelConfig, params), for the six families.

`load_pretrained` reads `config.json` and `model.safetensors` (or a sharded index) into the
tree of `moe_jax.model.layout`; `save_pretrained` writes per-expert keys that stock
transformers loads (uniform models as the stock family; non-uniform ones, whose expert sizes
travel in config.json under ``moe_jax``, through the remote code in ``remote_code/``, with
trust_remote_code=True) and that `load_pretrained` reads back.

Why it is built this way:
- One key map (`keymap.FAMILY_NAMES`, `keymap._LAYER_KEYS`) says where every tensor of every family lives;
  which rows a layer uses follows from the config, so loading and saving cannot disagree.
- Every key, shape and dtype is checked from the safetensors headers before any tensor data
  is read, so a bad checkpoint fails fast, with the key, file and shapes named.
- Tensors are read, converted and placed one at a time; experts are written straight into
  their preallocated width bucket. Peak host memory is about one copy of the weights in the
  target dtype plus one layer's buckets, never the whole checkpoint in float32.
- The router kernel and DeepSeek-V3's score bias stay float32 whatever `dtype` says (router
  maths is float32; transformers keeps `e_score_correction_bias` float32 too). They are tiny.
- A save writes into a temporary directory beside `out_dir` and renames it at the end, so a
  failed or interrupted save never leaves a half-written checkpoint.
"""

from moe_jax.hf.keymap import (  # noqa: F401
    CONFIG_NAME,
    INDEX_NAME,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    expected_param_shapes,
    hf_key_map,
)
from moe_jax.hf.load import load_pretrained, load_tokenizer  # noqa: F401
from moe_jax.hf.save import save_pretrained  # noqa: F401
