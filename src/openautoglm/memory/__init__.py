"""Memory modelling: where the bytes of a model go (estimate, profile, plan)."""

from .estimate import MemoryEstimate, estimate_memory, kv_cache_bytes, model_bytes
from .profile import MemoryProfiler, TensorTracker

__all__ = ["MemoryEstimate", "MemoryProfiler", "TensorTracker", "estimate_memory", "kv_cache_bytes", "model_bytes",
           "plan_training"]


def __getattr__(name):
    if name in ("plan_training", "TrainingPlan"):
        from . import plan

        return getattr(plan, name)
    raise AttributeError(name)
