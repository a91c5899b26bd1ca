"""mmx_jax: MambaMixer selective state-space models (TSM2, ViM2, ViQS) in JAX and Flax NNX."""

from mmx_jax.ssm import selective_scan

__version__ = "0.1.0"
__all__ = ["selective_scan", "__version__"]
