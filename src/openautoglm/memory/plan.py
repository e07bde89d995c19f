"""Training planner: ``plan_training(model, budget="40GiB", global_batch=32, seq_len=2048) -> TrainingPlan``.

Every combination of AMP mode, optimizer, activation checkpointing and micro-batch (a divisor of the global
batch; the rest is gradient accumulation) is estimated with :func:`estimate_memory`; plans over the budget are
dropped. Among the rest the planner keeps the best *quality tier* (AdamW with bf16 autocast and fp32 master
weights first; then pure bf16 AdamW; fp16 autocast; Adafactor; SGD) and in it the most throughput, modelled as

    relative tokens/s = utilization(micro-batch tokens) / (1 + 1/3 if checkpointing)

where ``utilization(n) = n / (n + 2048)`` (small micro-batches leave the GPU idle between kernels) and
checkpointing re-runs the forward pass (1/3 of a forward+backward). It never returns a plan over budget:
when nothing fits it raises :class:`NoFeasiblePlan` naming the smallest budget that would fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..training.loop import TrainConfig
from ..units import format_bytes, parse_bytes
from .estimate import MemoryEstimate, estimate_memory
from .optimizers import NAMES
from .shapes import ModelShape, model_shape

# (amp, optimizer) in order of preference: training quality and stability first
# (amp, optimizer kind) in order of preference: training quality and stability first. Each tier tries the
# allowed optimizer names of its kind (the default, adamw_fused, is what openautoglm.training.loop builds).
TIERS = [("bf16", "adamw"), ("none", "adamw"), ("fp16", "adamw"), ("bf16", "adafactor"), ("none", "adafactor"),
         ("bf16", "sgd"), ("none", "sgd")]


class NoFeasiblePlan(ValueError):
    """No training configuration fits the budget; ``min_budget`` is the smallest that would."""

    def __init__(self, message: str, min_budget: int):
        super().__init__(message)
        self.min_budget = min_budget


@dataclass
class TrainingPlan:
    """The chosen configuration, its estimate, and why."""

    budget: int
    global_batch: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    grad_checkpointing: bool
    amp: str
    optimizer: str
    estimate: MemoryEstimate
    relative_throughput: float
    explanation: list[str] = field(default_factory=list)
    considered: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.estimate.total

    def train_config(self, **overrides):
        """A :class:`openautoglm.training.loop.TrainConfig` running this plan (``overrides``: steps, lr, out_dir, ...)."""
        return TrainConfig(**{"micro_batch": self.micro_batch, "grad_accum": self.grad_accum, "seq_len": self.seq_len,
                              "amp": self.amp, "optimizer": self.optimizer,
                              "grad_checkpointing": self.grad_checkpointing, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "estimate"} | {"estimate": self.estimate.to_dict()}


def throughput(micro_tokens: int, ckpt: bool) -> float:
    return micro_tokens / (micro_tokens + 2048) / (4 / 3 if ckpt else 1.0)


def _budget_bytes(budget) -> int:
    b = parse_bytes(budget)
    if b <= 0:
        raise ValueError(f"budget={budget!r} must be positive")
    return b


MAX_GLOBAL_BATCH = 2**20  # sequences per optimizer step; far above any published run, low enough to plan at once


def divisors(n: int) -> list[int]:
    """Divisors of ``n``, largest first, in O(sqrt(n)) steps (a range over ``n`` hangs for a typo'd 10**12)."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]), reverse=True)


def plan_training(model_or_config_or_path, budget="40GiB", global_batch: int = 32, seq_len: int = 2048,
                  amp_modes: tuple[str, ...] = ("bf16", "none", "fp16"),
                  optimizers: tuple[str, ...] = ("adamw_fused", "adafactor", "sgd"),
                  allow_checkpointing: bool = True) -> TrainingPlan:
    """Choose micro-batch, accumulation, checkpointing, AMP mode and optimizer that fit ``budget``.

    Parameters
    ----------
    model_or_config_or_path : anything :func:`estimate_memory` accepts (read once, meta device).
    budget : bytes or a size string ("40GiB", "24GB").
    global_batch : sequences per optimizer step (= micro_batch x grad_accum).
    seq_len : tokens per sequence.
    amp_modes, optimizers : the candidates allowed (e.g. drop "bf16" on GPUs without bf16).

    Raises
    ------
    NoFeasiblePlan (a ValueError) when nothing fits; its message names the smallest feasible budget.
    """
    budget_b = _budget_bytes(budget)
    for name, v in (("global_batch", global_batch), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    if global_batch > MAX_GLOBAL_BATCH:
        raise ValueError(f"global_batch={global_batch} sequences per optimizer step is more than this planner "
                         f"handles ({MAX_GLOBAL_BATCH:,})")
    shape = model_or_config_or_path if isinstance(model_or_config_or_path, ModelShape) else model_shape(model_or_config_or_path)
    micro_batches = divisors(global_batch)
    best: TrainingPlan | None = None
    smallest: tuple[int, MemoryEstimate] | None = None
    considered = 0
    optimizers = (optimizers,) if isinstance(optimizers, str) else tuple(optimizers)
    for name in optimizers:
        if name not in NAMES:
            raise ValueError(f"optimizers: {name!r} is not one of {', '.join(NAMES)}")
    for amp, kind in TIERS:
        if amp not in amp_modes:
            continue
        tier_best: TrainingPlan | None = None
        for opt, ckpt in ((o, c) for o in optimizers if NAMES[o][0] == kind
                          for c in ((False, True) if allow_checkpointing else (False,))):
            for mb in micro_batches:
                est = estimate_memory(shape, mode="train", batch=mb, seq_len=seq_len, amp=amp, optimizer=opt,
                                      grad_checkpointing=ckpt, grad_accum=global_batch // mb,
                                      dtype="bf16" if amp == "none" else None)
                considered += 1
                if smallest is None or est.total < smallest[0]:
                    smallest = (est.total, est)
                if est.total > budget_b:
                    continue
                tp = throughput(mb * seq_len, ckpt)
                if tier_best is None or tp > tier_best.relative_throughput:
                    tier_best = TrainingPlan(budget_b, global_batch, seq_len, mb, global_batch // mb, ckpt, amp, opt,
                                             est, tp)
                break  # micro-batches are tried largest first: the first that fits is the fastest for this ckpt
        if tier_best is not None:
            best = tier_best
            break
    if best is None:
        assert smallest is not None
        s = smallest[1].settings
        raise NoFeasiblePlan(
            f"nothing fits in {format_bytes(budget_b)} for global batch {global_batch} x {seq_len} tokens of {shape.name}: "
            f"the smallest feasible budget is {format_bytes(smallest[0])} (micro-batch {s['batch']}, "
            f"checkpointing {'on' if s['grad_checkpointing'] else 'off'}, amp {s['amp']}, {s['optimizer']}); "
            "lower seq_len, or shrink the model", smallest[0])
    best.considered = considered
    best.explanation = _explain(best, shape)
    return best


def _explain(p: TrainingPlan, shape) -> list[str]:
    e = p.estimate
    lines = [
        f"{shape.name}: {shape.n_params / 1e6:,.1f} M parameters; budget {format_bytes(p.budget)}, "
        f"global batch {p.global_batch} x {p.seq_len} tokens",
        f"chosen: micro-batch {p.micro_batch} x {p.grad_accum} accumulation steps, checkpointing "
        f"{'on' if p.grad_checkpointing else 'off'}, amp {p.amp}, optimizer {p.optimizer}",
        f"estimated peak {format_bytes(e.total)} ({100 * e.total / p.budget:.0f}% of the budget) at {e.phase}",
    ]
    if p.amp == "bf16" and p.optimizer.startswith("adamw"):
        lines.append("AdamW with bf16 autocast and fp32 master weights (16 B/param + activations) fits: the preferred setup")
    else:
        lines.append(f"AdamW with bf16 autocast does not fit in the budget at any micro-batch; fell back to amp "
                     f"{p.amp} + {p.optimizer}")
    if p.grad_checkpointing:
        lines.append("checkpointing is on: without it no micro-batch fits as fast (it costs ~1/3 more compute)")
    if p.grad_accum > 1:
        lines.append(f"{p.grad_accum} accumulation steps keep the global batch at {p.global_batch}")
    lines.append(f"relative throughput {p.relative_throughput:.2f} (1.0 = large micro-batch, no recompute); "
                 f"{p.considered} configurations estimated")
    return lines
