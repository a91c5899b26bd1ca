"""The tests' float64 NumPy references: the selective scan (S6) one step at a time, the same
along the walks of a 2-D map, and the relative error they are compared by. Shared by the tests
of `selective_scan`, `selective_scan_2d` and the Pallas kernels.

Everything here is written from the definitions (S6, the scan orders of ViM2 and ViQS), with
its own walk orders built by nested loops: it shares no code with `mmx_jax.ssm`,
`mmx_jax.ssm.scan_orders` or `kernels_pallas.walks`.
"""

from __future__ import annotations

import numpy as np

WALKS = ("row", "col", "snake_row", "snake_col", "row_rev", "col_rev", "snake_row_rev",
         "snake_col_rev")


def numpy_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               reverse=False, initial_state=None, return_final_state=False):
    """The S6 recurrence, one step at a time, in float64: y (b, L, E), or (y, h_last)."""
    f = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    u, delta, A, B, C, D, z, bias, h = map(f, (u, delta, A, B, C, D, z, delta_bias,
                                               initial_state))
    b, length, e = u.shape
    n = A.shape[1]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    g = B.shape[2]
    if bias is not None:
        delta = delta + bias
    if delta_softplus:
        delta = np.log1p(np.exp(delta))
    h = np.zeros((b, e, n)) if h is None else h.copy()
    group = np.arange(e) // (e // g)
    y = np.zeros((b, length, e))
    for t in (range(length - 1, -1, -1) if reverse else range(length)):
        bt, ct = B[:, t][:, group], C[:, t][:, group]  # (b, e, n)
        h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * bt
        y[:, t] = np.einsum("ben,ben->be", h, ct)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))
    return (y, h) if return_final_state else y


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref||, after checking that x has ref's shape and no NaN or inf."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert np.all(np.isfinite(x)), "non-finite values (an element was not written?)"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def walk_order(name: str, height: int, width: int) -> list[int]:
    """Row-major positions h * W + w in the order the walk `name` visits them."""
    base, rev = (name[:-4], True) if name.endswith("_rev") else (name, False)
    order = []
    if base in ("row", "snake_row"):
        for h in range(height):
            ws = range(width) if base == "row" or h % 2 == 0 else range(width - 1, -1, -1)
            order += [h * width + w for w in ws]
    elif base in ("col", "snake_col"):
        for w in range(width):
            hs = range(height) if base == "col" or w % 2 == 0 else range(height - 1, -1, -1)
            order += [h * width + w for h in hs]
    else:
        raise ValueError(name)
    return order[::-1] if rev else order


def numpy_walk_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    *, walk_names, shift=False, summed=True, weights=None):
    """The walks one by one, one step at a time, in float64.

    u, z: (b, H, W, E); delta: (K, b, H, W, E); A: (K, E, N); B, C: (b, H, W, K, N);
    D, delta_bias: (K, E); walk_names[b][k]: the walk of slot k of sample b; weights (b, K).
    Returns (b, H, W, E) summed (weighted), or (K, b, H, W, E).
    """
    f = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    u, delta, A, B, C, D, z, bias, weights = map(f, (u, delta, A, B, C, D, z, delta_bias,
                                                     weights))
    b, height, width, e = u.shape
    k = delta.shape[0]
    length = height * width
    u, z = u.reshape(b, length, e), None if z is None else z.reshape(b, length, e)
    delta = np.moveaxis(delta.reshape(k, b, length, e), 0, 2)  # (b, L, K, E)
    B, C = B.reshape(b, length, k, -1), C.reshape(b, length, k, -1)
    if bias is not None:
        delta = delta + bias
    if delta_softplus:
        delta = np.log1p(np.exp(delta))
    y = np.zeros((b, length, k, e))
    for i in range(b):
        for j in range(k):
            order = walk_order(walk_names[i][j], height, width)
            h = np.zeros((e, A.shape[2]))
            for s, pos in enumerate(order):
                dt = delta[i, pos, j]
                h = np.exp(dt[:, None] * A[j]) * h + (dt * u[i, pos])[:, None] * B[i, pos, j]
                out = h @ C[i, pos, j]
                if D is not None:
                    out = out + D[j] * u[i, pos]
                if z is not None:
                    out = out * z[i, pos] / (1.0 + np.exp(-z[i, pos]))
                if not shift:
                    y[i, pos, j] = out
                elif s + 1 < length:  # QS's shift: the next position's; the first gets 0
                    y[i, order[s + 1], j] = out
    if summed:
        y = (y if weights is None else y * weights[:, None, :, None]).sum(axis=2)
        return y.reshape(b, height, width, e)
    return np.moveaxis(y, 2, 0).reshape(k, b, height, width, e)


def random_walk_inputs(rng, b=2, height=3, width=5, e=8, n=4, k=3, *, dtype=np.float32,
                       softplus=True, D=True, z=False, bias=True):
    """Random map-layout arguments (never zeros) of a walk scan."""
    args = dict(
        u=rng.normal(size=(b, height, width, e)),
        delta=rng.normal(size=(k, b, height, width, e)) * 0.5,
        A=-np.exp(rng.normal(size=(k, e, n)) * 0.5),
        B=rng.normal(size=(b, height, width, k, n)),
        C=rng.normal(size=(b, height, width, k, n)),
    )
    if not softplus:
        args["delta"] = np.abs(args["delta"]) + 0.05
    if D:
        args["D"] = rng.normal(size=(k, e))
    if z:
        args["z"] = rng.normal(size=(b, height, width, e))
    if bias:
        args["delta_bias"] = rng.normal(size=(k, e)) * 0.5
        if not softplus:  # keep the step size positive, as softplus would
            args["delta_bias"] = np.abs(args["delta_bias"]) * 0.1
    return {name: x.astype(dtype) for name, x in args.items()}
