"""Pruning: quality of heads / sparsity / low-rank on the bundled model, 2:4 speed on the GPU."""
