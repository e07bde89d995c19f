"""Compress to a memory budget: the auto pick against uniform recipes, and a 7B pick run on the GPU."""
