"""Pallas selective-scan kernels (GPU via Triton, TPU via Mosaic). Imports nothing from mmx_jax.

`selective_scan` has the semantics of Mamba's selective scan, S6 (channels-last):

    u, delta, z : (batch, L, E)    A : (E, N)    B, C : (batch, L, N) or (batch, L, G, N)
    D, delta_bias : (E,)           initial_state : (batch, E, N)

with forward and backward kernels wired through `jax.custom_vjp`. On a CPU the kernels run in
Pallas interpret mode (slow; for tests).

`selective_scan_walks` runs the same kernels along K walks of a 2-D map (`walks`), reading
the map and the per-walk arrays where they lie and writing each walk's output back to the
map positions, with no permuted copy of the map:

    u, z : (batch, H, W, E)       delta : (K, batch, H, W, E)      B, C : (batch, H, W, K, N)
    A : (K, E, N)                 D, delta_bias : (K, E)            walk codes : (1 or batch, K)
"""

from __future__ import annotations

import logging

import jax

from kernels_pallas import mosaic_scan, mosaic_walks, triton_scan
from kernels_pallas.scan_vjp import Options, Walks, make_scan, normalise, normalise_walks
from kernels_pallas.walks import NAMES as WALK_NAMES
from kernels_pallas.walks import walk_code, walk_position

BACKENDS = ("triton", "mosaic")
_GPU_PLATFORMS = ("gpu", "cuda")

log = logging.getLogger(__name__)

_SCANS = {
    "triton": make_scan(triton_scan.forward, triton_scan.backward),
    "mosaic": make_scan(mosaic_scan.forward, mosaic_scan.backward),
}
# Walks of a 2-D map: the Triton kernels take them as they are (`Options.walks`); Mosaic has
# kernels of their own (the whole map of a channel block in VMEM).
_WALK_SCANS = {
    "triton": _SCANS["triton"],
    "mosaic": make_scan(mosaic_walks.forward, mosaic_walks.backward),
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


def selective_scan_walks(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, *, walk_codes, shift=False, summed=True,
                         weights=None, backend: str | None = None, interpret=None, config=None):
    """Selective scans along K walks of a 2-D map, fused Pallas forward and backward.

    Walk k of sample b visits the map in the order `walk_codes[b, k]` (`walks.walk_code`),
    reads u (and z) of the map and its own delta, B, C at each position it visits, and runs
    the S6 recurrence with its own A, D and delta_bias; its output at a step
    goes to the map position of that step (with `shift`, of the next step: QS's shift
    (the QSMixer of the paper's later versions); the first position then gets 0 from that walk).

    Args:
      u: (batch, H, W, E) the map, read by every walk.  z: optional (batch, H, W, E) gate,
        each walk's output *= silu(z) at the step's own position (before the shift).
      delta: (K, batch, H, W, E) each walk's step size at each position.
      A: (K, E, N).  B, C: (batch, H, W, K, N).  D, delta_bias: optional (K, E).
      delta_softplus: delta <- softplus(delta + delta_bias).
      walk_codes: int (1, K) walks shared by the batch, or (batch, K) per sample.
      shift: QS's shift of every walk's output by one step.
      summed: return the sum over walks (batch, H, W, E), weighted by `weights` (batch, K)
        when given; else every walk's output (K, batch, H, W, E).
      backend, interpret, config: as `selective_scan`.

    Returns:
      (batch, H, W, E) or (K, batch, H, W, E) in u's dtype.
    """
    if weights is not None and not summed:
        raise ValueError("kernels_pallas.selective_scan_walks: weights weigh the sum over "
                         "walks, so they need summed=True")
    backend, interpret = _resolve(backend, interpret)
    args, (height, width, k) = normalise_walks(u, delta, A, B, C, D, z, delta_bias, walk_codes,
                                               weights)
    walks = Walks(height=height, width=width, per_sample=args.walk_codes.shape[0] > 1,
                  shift=bool(shift), summed=bool(summed), weighted=weights is not None)
    opts = Options(
        delta_softplus=bool(delta_softplus), reverse=False, has_D=D is not None,
        has_z=z is not None, has_bias=delta_bias is not None, has_h0=False, has_dh_last=False,
        backend_config=config if config is not None else _DEFAULT_CONFIGS[backend](),
        interpret=interpret, walks=walks)
    y, _ = _WALK_SCANS[backend](opts, args)
    return y.reshape(u.shape if summed else (k, *u.shape))


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


def unsupported_walks_reason(platform: str, *, batch: int, height: int, width: int,
                             channels: int, walks: int, state: int) -> str | None:
    """None when the compiled Pallas walk kernels of `platform` handle this shape, else why not.

    Args:
      platform: a JAX platform name.
      batch, height, width, channels, walks, state: the map's (batch, H, W, E), the number of
        walk slots K and the state size N.
    """
    if platform in _GPU_PLATFORMS:  # the 1-D kernels' limits, with the K walks as groups
        return triton_scan.unsupported_reason(batch=batch, length=height * width,
                                              channels=walks * channels, state=state,
                                              groups=walks)
    if platform == "tpu":
        return mosaic_walks.unsupported_reason(batch, height, width, channels, walks, state)
    return f"no compiled Pallas walk scan for platform {platform!r} (interpret mode only)"


__all__ = ["BACKENDS", "WALK_NAMES", "selective_scan", "selective_scan_walks",
           "unsupported_reason", "unsupported_walks_reason", "walk_code", "walk_position"]
