"""Model families (one file each) and the registry that names them."""

from mmx_jax.models.registry import count_params, create_model, list_models, register_model
from mmx_jax.models.tsm2 import TSM2

register_model("tsm2", TSM2)

__all__ = ["TSM2", "count_params", "create_model", "list_models", "register_model"]
