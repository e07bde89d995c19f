"""Budgets: ``"12GiB"``, ``"512 MB"``, a number of bytes, or ``"auto"`` (free memory of the chosen GPU)."""

from __future__ import annotations

import math

import torch

from ..units import format_bytes as fmt_bytes
from ..units import parse_bytes

EXAMPLES = "e.g. 12GiB, 512MiB, 8GB, a number of bytes, or auto (free memory of the GPU)"


class BudgetError(ValueError):
    """No recipe of the search space fits the budget; ``smallest`` is the least memory one needs (bytes) and
    ``smallest_perplexity`` its predicted perplexity."""

    def __init__(self, message: str, smallest: int | None = None, smallest_perplexity: float | None = None):
        super().__init__(message)
        self.smallest, self.smallest_perplexity = smallest, smallest_perplexity


def free_gpu_memory(device: str | torch.device | None = None) -> int:
    """Free bytes of a CUDA device (``torch.cuda.mem_get_info``); a clear error on machines without one."""
    if not torch.cuda.is_available():
        raise ValueError("budget 'auto' means the free memory of the GPU, but no CUDA GPU is available here; "
                         "give a size instead (" + EXAMPLES.replace(", or auto (free memory of the GPU)", "") + ")")
    dev = torch.device(device if device not in (None, "auto") else "cuda")
    if dev.type != "cuda":
        raise ValueError(f"budget 'auto' needs a CUDA device, got device {str(dev)!r}")
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free)


def parse_budget(budget, device=None) -> int:
    """Bytes of ``budget``: an int/float number of bytes, a size string or ``"auto"``. Must be positive."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(f"budget must be a size string ({EXAMPLES}) or a number of bytes, got {budget!r}")
    if isinstance(budget, str):
        text = budget.strip()
        if text.lower() == "auto":
            return free_gpu_memory(device)
        if text.startswith("-"):
            raise ValueError(f"budget {budget!r} is negative; give a positive size ({EXAMPLES})")
        try:
            value = parse_bytes(text)
        except ValueError:
            raise ValueError(f"cannot read the budget {budget!r}; write {EXAMPLES}") from None
    else:
        if not math.isfinite(budget):
            raise ValueError(f"budget {budget!r} is not a finite number of bytes")
        if budget < 0:
            raise ValueError(f"budget {budget!r} is negative; give a positive size ({EXAMPLES})")
        value = parse_bytes(budget)
    if value <= 0:
        raise ValueError(f"budget {budget!r} is {'zero' if value == 0 else 'negative'}; give a positive size ({EXAMPLES})")
    return value


__all__ = ["BudgetError", "fmt_bytes", "free_gpu_memory", "parse_budget"]
