"""Training: the memory-planned fine-tuning loop (:mod:`.loop`) and its atomic, resumable checkpoints
(:mod:`.checkpoints`)."""

from .loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
