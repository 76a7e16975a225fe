"""Pallas kernels for routing, token permutation and grouped matmul (GPU/TPU; interpret on CPU).

Each kernel lives in its own module with a pure-JAX reference beside it.
"""
