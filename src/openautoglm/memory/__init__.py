"""Memory modelling: where the bytes of a model go (estimate, profile, plan)."""

from .estimate import kv_cache_bytes, model_bytes

__all__ = ["kv_cache_bytes", "model_bytes"]
