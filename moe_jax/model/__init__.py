"""The MoE decoder: `init`, `forward`, `generate` over plain param dicts (see layout.py)."""

from moe_jax.model.decode import generate, init_cache
from moe_jax.model.transformer import apply, count_params, default_positions, forward, init, param_shapes

__all__ = ["apply", "count_params", "default_positions", "forward", "generate", "init", "init_cache", "param_shapes"]
