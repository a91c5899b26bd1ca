"""Pallas selective-scan kernels (GPU via Triton, TPU via Mosaic). Imports nothing from mmx_jax.

`selective_scan` has the semantics of SPEC section 1 (channels-last):

    u, delta, z : (batch, L, E)    A : (E, N)    B, C : (batch, L, N) or (batch, L, G, N)
    D, delta_bias : (E,)           initial_state : (batch, E, N)

with forward and backward kernels wired through `jax.custom_vjp`. On a CPU the kernels run in
Pallas interpret mode (slow; for tests).
"""

from __future__ import annotations

import logging

import jax

from kernels_pallas import mosaic_scan, triton_scan
from kernels_pallas.scan_vjp import Options, make_scan, normalise

BACKENDS = ("triton", "mosaic")
_GPU_PLATFORMS = ("gpu", "cuda")

log = logging.getLogger(__name__)

_SCANS = {
    "triton": make_scan(triton_scan.forward, triton_scan.backward),
    "mosaic": make_scan(mosaic_scan.forward, mosaic_scan.backward),
}
_DEFAULT_CONFIGS = {"triton": triton_scan.TritonConfig, "mosaic": mosaic_scan.MosaicConfig}


def _resolve(backend: str | None, interpret) -> tuple[str, object]:
    platform = jax.default_backend()
    if backend is None:
        backend = "mosaic" if platform == "tpu" else "triton"
    if backend not in BACKENDS:
        raise ValueError(f"kernels_pallas.selective_scan: backend={backend!r} is not one of "
                         f"{BACKENDS}")
    if interpret is None:
        native = (backend == "triton" and platform in _GPU_PLATFORMS) or (
            backend == "mosaic" and platform == "tpu")
        interpret = not native
    if interpret is True and backend == "mosaic":
        interpret = mosaic_scan.interpret_params()
    return backend, interpret


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   reverse=False, initial_state=None, return_final_state=False, *,
                   backend: str | None = None, interpret=None, config=None):
    """Fused selective scan with Pallas forward and backward kernels.

    Args:
      u, delta: (batch, L, E) input and step size (float32 or bfloat16).
      A: (E, N).  B, C: (batch, L, N) or (batch, L, G, N).
      D, delta_bias: optional (E,).  z: optional (batch, L, E) gate, y *= silu(z).
      delta_softplus: delta <- softplus(delta + delta_bias).
      reverse: scan from the last step to the first.
      initial_state: optional (batch, E, N) state before the first step scanned.
      return_final_state: also return the (batch, E, N) float32 state after the last step.
      backend: "triton" (GPU) or "mosaic" (TPU); None picks by the default device
        ("triton" on CPU, in interpret mode).
      interpret: run the kernel in Pallas interpret mode; None means "when the device does
        not match the backend".
      config: the backend's static tuning (`triton_scan.TritonConfig` or
        `mosaic_scan.MosaicConfig`); None takes the defaults.

    Returns:
      y (batch, L, E) in u's dtype, or (y, final_state) when return_final_state.
    """
    backend, interpret = _resolve(backend, interpret)
    args = normalise(u, delta, A, B, C, D, z, delta_bias, initial_state)
    opts = Options(
        delta_softplus=bool(delta_softplus), reverse=bool(reverse), has_D=D is not None,
        has_z=z is not None, has_bias=delta_bias is not None,
        has_h0=initial_state is not None, has_dh_last=bool(return_final_state),
        backend_config=config if config is not None else _DEFAULT_CONFIGS[backend](),
        interpret=interpret)
    y, h_last = _SCANS[backend](opts, args)
    return (y, h_last) if return_final_state else y


def unsupported_reason(platform: str, *, batch: int, length: int, channels: int, state: int,
                       groups: int) -> str | None:
    """None when the compiled kernels of `platform` handle this shape, else the reason why not.

    Args:
      platform: a JAX platform name ("gpu", "cuda", "tpu", "cpu", ...).
      batch, length, channels, state, groups: the scan's (batch, L, E, N, G).
    """
    dims = dict(batch=batch, length=length, channels=channels, state=state, groups=groups)
    if platform in _GPU_PLATFORMS:
        return triton_scan.unsupported_reason(**dims)
    if platform == "tpu":
        return mosaic_scan.unsupported_reason(**dims)
    return f"no compiled Pallas selective scan for platform {platform!r} (interpret mode only)"


__all__ = ["BACKENDS", "selective_scan", "unsupported_reason"]
