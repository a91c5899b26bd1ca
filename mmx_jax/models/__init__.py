"""Model families (one file each), the registry that names them and the pretrained zoo."""

from mmx_jax.models.pretrained import list_pretrained, load_pretrained
from mmx_jax.models.registry import count_params, create_model, list_models, register_model
from mmx_jax.models.tsm2 import TSM2
from mmx_jax.models.vim2 import SIZES as VISION_SIZES
from mmx_jax.models.vim2 import ViM2
from mmx_jax.models.viqs import ViQS

register_model("tsm2", TSM2)
for _size, _args in VISION_SIZES.items():
    register_model(f"vim2_{_size}", ViM2, **_args)
    register_model(f"vim2_{_size}_mlp", ViM2, channel_mixer="mlp", **_args)
    register_model(f"viqs_{_size}", ViQS, **_args)

__all__ = ["TSM2", "ViM2", "ViQS", "count_params", "create_model", "list_models",
           "list_pretrained", "load_pretrained", "register_model"]
