"""Peak scratch memory of the associative selective scan as the length grows.

    python benchmarks/assoc_memory.py [--batch 2 --channels 256 --state 16]

Prints, for each length, the compiled temporary memory (XLA's memory analysis of the jitted
function, on the default backend) of the forward pass and of forward+backward, for the chunked
implementation (chunk 128) and for one chunk spanning the whole length (unchunked). The chunked
column stays nearly flat; the unchunked one grows with batch * length * E * N.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from mmx_jax.ssm import selective_scan_associative


def temp_mib(batch, length, channels, state, chunk, backward):
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
              ((batch, length, channels), (batch, length, channels), (channels, state),
               (batch, length, state), (batch, length, state))]

    def forward(*args):
        return selective_scan_associative(*args, chunk_size=chunk)

    fn = (jax.grad(lambda *a: forward(*a).sum(), argnums=(0, 1, 2, 3, 4)) if backward
          else forward)
    stats = jax.jit(fn).lower(*shapes).compile().memory_analysis()
    return float("nan") if stats is None else stats.temp_size_in_bytes / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    args = parser.parse_args()
    dims = (args.batch, args.channels, args.state)
    print(f"backend={jax.default_backend()} batch={args.batch} E={args.channels} "
          f"N={args.state} chunk={args.chunk}; compiled temp memory in MiB")
    print("| length | chunked fwd | chunked fwd+bwd | unchunked fwd | unchunked fwd+bwd |")
    print("|---|---|---|---|---|")
    for length in args.lengths:
        b, e, n = dims
        row = [temp_mib(b, length, e, n, chunk, bwd)
               for chunk in (args.chunk, length) for bwd in (False, True)]
        print(f"| {length} | " + " | ".join(f"{v:.1f}" for v in row) + " |")


if __name__ == "__main__":
    main()
