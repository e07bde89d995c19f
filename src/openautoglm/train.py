"""Deprecated location, kept for one release: use :mod:`openautoglm.training`.

``from openautoglm.train import train, TrainConfig`` keeps working; new code imports
``from openautoglm.training import train, TrainConfig``.
"""

from .training import TrainConfig, TrainResult, train  # noqa: F401

__all__ = ["TrainConfig", "TrainResult", "train"]
