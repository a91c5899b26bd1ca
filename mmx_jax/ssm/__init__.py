"""Selective state-space math: pure functions, no parameters."""

from mmx_jax.ssm.scan import (
    IMPLS,
    ScanDims,
    check_scan_args,
    resolve_impl,
    selective_scan,
    selective_scan_associative,
    selective_scan_pallas,
    selective_scan_sequential,
    selective_scan_sequential_vjp,
)
from mmx_jax.ssm.scan_2d import WalkDims, check_walk_args, resolve_impl_2d, selective_scan_2d

__all__ = [
    "IMPLS",
    "ScanDims",
    "WalkDims",
    "check_scan_args",
    "check_walk_args",
    "resolve_impl",
    "resolve_impl_2d",
    "selective_scan",
    "selective_scan_2d",
    "selective_scan_associative",
    "selective_scan_pallas",
    "selective_scan_sequential",
    "selective_scan_sequential_vjp",
]
