"""ViQS: ViM2 with QSMixer blocks and Switch of Scans (our reading of the paper's later versions).

The same hierarchy, widths and depths as ViM2 (`vim2.SIZES`); two mixers change:

- token mixer: `SwitchOfScansTokenMixer`: a multi-resolution gate picks, per sample, the top-k
  (4) of 8 scan orders (row, column, snake-row, snake-column, each forward and reversed); each
  of the k slots runs a quasi-separable (non-causal, shared-A) S6 along its order, and the slot
  outputs are summed with the softmax of the chosen logits. That is 2k = 8 scan directions per
  token block against ViM2's 4 (see `mmx_jax.layers.switch_of_scans` for the cost);
  `quasi_separable_tokens=False` makes each slot one causal direction (4 directions).
- channel mixer: `ChannelGroupMixer` with the quasi-separable S6 along the channel groups
  instead of two independent directions.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from mmx_jax.layers import ALL_ORDERS, SwitchOfScansTokenMixer
from mmx_jax.models.vim2 import ViM2


class ViQS(ViM2):
    """ViM2 with Switch of Scans token mixers and quasi-separable mixers.

    Args:
      scans: the bank of candidate scan orders (`ALL_ORDERS`, 8).
      top_k: scans used per sample (slots, each with its own S6 parameters).
      quasi_separable_tokens: each slot a quasi-separable scan (True) or one causal direction.
      quasi_separable_channels: quasi-separable S6 along the channel groups.
      gate_kernel_size, gate_dilations: the gate's stack of depthwise convolutions.
      **kwargs: every other `ViM2` argument (widths, depths, stem, S6 sizes, norm, drop-path,
        scan_impl, dtype, ...).
    """

    def __init__(self, *, scans: Sequence[str] = ALL_ORDERS, top_k: int = 4,
                 quasi_separable_tokens: bool = True, quasi_separable_channels: bool = True,
                 gate_kernel_size: int = 3, gate_dilations: Sequence[int] = (1, 2, 4),
                 rngs: nnx.Rngs, **kwargs):
        # Read by make_token_mixer, which ViM2.__init__ calls while building the stages.
        self.switch_args = dict(top_k=top_k, quasi_separable=quasi_separable_tokens,
                                gate_kernel_size=gate_kernel_size,
                                gate_dilations=tuple(gate_dilations))
        super().__init__(scans=scans, quasi_separable_channels=quasi_separable_channels,
                         rngs=rngs, **kwargs)

    def make_token_mixer(self, dim: int, *, rngs: nnx.Rngs) -> nnx.Module:
        """A `SwitchOfScansTokenMixer` at width `dim`: (B, H, W, dim) -> same."""
        return SwitchOfScansTokenMixer(dim, rngs=rngs, **self.mixer_args, **self.switch_args)
