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

__all__ = [
    "IMPLS",
    "ScanDims",
    "check_scan_args",
    "resolve_impl",
    "selective_scan",
    "selective_scan_associative",
    "selective_scan_pallas",
    "selective_scan_sequential",
    "selective_scan_sequential_vjp",
]
