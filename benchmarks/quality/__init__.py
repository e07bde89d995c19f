"""Quality benchmarks (perplexity on real pretrained models); run as ``python -m benchmarks.quality.<name>``."""
