"""KV cache compression: quality on the bundled model, decode speed and capacity on the GPU, kernel sweeps."""
