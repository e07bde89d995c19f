"""Memory modelling: where the bytes of a model go (estimate, profile, plan)."""

from .estimate import MemoryEstimate, estimate_memory, kv_cache_bytes, model_bytes
from .plan import TrainingPlan, plan_training
from .profile import MemoryProfiler, TensorTracker

__all__ = ["MemoryEstimate", "MemoryProfiler", "TensorTracker", "estimate_memory", "kv_cache_bytes", "model_bytes",
           "plan_training", "TrainingPlan"]

