"""moe_jax: compress Mixture-of-Experts language models in JAX and measure what it costs."""

from moe_jax.config import ModelConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "__version__"]
