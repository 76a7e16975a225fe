"""Meshes, shardings and expert parallelism on JAX's own runtime."""
