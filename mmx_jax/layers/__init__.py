"""Flax NNX layers: S6 parameters, selective token/channel mixers, the MambaMixer stack."""

from mmx_jax.layers.averaging import (
    AveragingWeights,
    DropPath,
    MambaMixerStack,
    ResidualBlock,
    averaging_layout,
    make_norm,
    residual_init,
)
from mmx_jax.layers.conv import DepthwiseConv2D, depthwise_conv2d
from mmx_jax.layers.linear import Linear
from mmx_jax.layers.mixers import (
    SCAN_LAYOUTS,
    ChannelGroupMixer,
    CrossScanTokenMixer,
    SelectiveChannelMixer,
    SelectiveTokenMixer,
    causal_depthwise_conv1d,
    shift_right,
)
from mmx_jax.layers.s6 import S6
from mmx_jax.layers.switch_of_scans import ScanGate, SwitchOfScansTokenMixer
from mmx_jax.ssm.scan_orders import (
    ALL_ORDERS,
    CROSS_SCAN,
    apply_scans,
    inverse_permutation,
    scan_map,
    scan_order,
    scan_orders,
    undo_scans,
    unscan_map,
)

__all__ = [
    "ALL_ORDERS",
    "CROSS_SCAN",
    "SCAN_LAYOUTS",
    "AveragingWeights",
    "ChannelGroupMixer",
    "CrossScanTokenMixer",
    "DepthwiseConv2D",
    "DropPath",
    "Linear",
    "MambaMixerStack",
    "ResidualBlock",
    "S6",
    "ScanGate",
    "SelectiveChannelMixer",
    "SelectiveTokenMixer",
    "SwitchOfScansTokenMixer",
    "apply_scans",
    "averaging_layout",
    "causal_depthwise_conv1d",
    "depthwise_conv2d",
    "inverse_permutation",
    "make_norm",
    "residual_init",
    "scan_order",
    "scan_map",
    "scan_orders",
    "shift_right",
    "undo_scans",
    "unscan_map",
]
