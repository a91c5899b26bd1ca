"""Pallas selective-scan kernels (GPU via Triton, TPU via Mosaic). Imports nothing from mmx_jax."""
