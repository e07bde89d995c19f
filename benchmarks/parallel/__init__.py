"""Tensor parallelism: overhead at one rank, scaling over several GPUs."""
