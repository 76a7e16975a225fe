"""Native CPU kernels for the tile-padded expert layout, called from XLA through the FFI.

`grouped_matmul.cc` is compiled on first use with the machine's C++ compiler (cached per
source, jaxlib and CPU: build.py); `tile_matmul.py` wraps it as JAX ops with custom_vjps.
When no compiler is found (or MOE_JAX_CPU_KERNELS=0) the `tiled` dispatcher keeps its
plain-XLA loop (kernels_pallas/tile_loop.py). Like kernels_pallas, a leaf: no moe_jax.
"""
