"""Optimizer memory: which implementation torch runs, the state it keeps and what ``step()`` allocates.

``torch.optim.AdamW(params)`` chooses its implementation at the first step (``torch/optim/optimizer.py``,
``_default_to_fused_or_foreach``): never the fused kernel by default; the *foreach* kernels when every
parameter is a plain tensor on a foreach device (CUDA, XPU, ...); else the *for-loop* ("single tensor") code.
What each one holds beyond the parameters and gradients (``torch/optim/adam.py``, AdamW = Adam with
decoupled weight decay):

* state: ``exp_avg`` and ``exp_avg_sq`` (and ``max_exp_avg_sq`` with ``amsgrad``), each ``zeros_like(param)``;
  a fp32 ``step`` scalar per parameter, on the parameter's device only when fused or ``capturable`` (else on
  the CPU, invisible to ``torch.cuda.max_memory_allocated``).
* fused (``torch._fused_adamw_``): no temporaries.
* foreach (``_multi_tensor_adam``): ``torch._foreach_sqrt(exp_avg_sqs)`` allocates a second copy of the whole
  (param group, device, dtype) bucket at once -- +4 B/param for fp32 parameters, the -19% a fused-only model missed
  (benchmarks/results/memory/bench_tinyllama.json).
* for-loop (``_single_tensor_adam``): ``denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)`` holds two
  parameter-sized temporaries at once, one parameter at a time: twice the largest parameter (three for Adam
  with L2 weight decay, whose ``grad + wd * param`` is a third).

SGD with momentum keeps one buffer; with weight decay, foreach SGD adds ``grads + wd * params`` for the whole
bucket (for-loop: one tensor at a time). Adafactor keeps factored row/column statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("adamw", "sgd", "adafactor")
IMPLS = ("fused", "foreach", "forloop")
# name -> (kind, implementation or None for "torch's default on the device")
NAMES: dict[str, tuple[str, str | None]] = {
    "adamw": ("adamw", None), "adamw_fused": ("adamw", "fused"), "adamw_foreach": ("adamw", "foreach"),
    "adamw_forloop": ("adamw", "forloop"), "sgd": ("sgd", None), "adafactor": ("adafactor", "forloop"),
}


def _foreach_devices() -> tuple[str, ...]:
    try:
        from torch.optim.optimizer import _get_foreach_kernels_supported_devices

        return tuple(_get_foreach_kernels_supported_devices())
    except ImportError:  # pragma: no cover - private helper moved
        return ("cuda", "xpu")


def default_impl(device: str | torch.device) -> str:
    """What ``torch.optim.AdamW(params)`` / ``SGD`` run by default for parameters on ``device``."""
    return "foreach" if torch.device(device).type in _foreach_devices() else "forloop"


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer as the estimator sees it; ``*_bytes`` fields are exact figures read from a live optimizer
    (``None``: derived from the model shape)."""

    kind: str                     # adamw | sgd | adafactor
    impl: str                     # fused | foreach | forloop
    states_per_param: int         # parameter-sized state tensors (AdamW 2, +1 amsgrad; SGD momentum 1)
    step_on_device: bool          # per-parameter fp32 'step' scalars live on the parameters' device
    weight_decay_temp: bool       # grads + wd * params is materialized (SGD, Adam with L2 decay)
    device_type: str = "cuda"
    state_bytes: int | None = None
    bucket_bytes: int | None = None   # largest (param group, device, dtype) bucket of parameters
    largest_bytes: int | None = None  # largest single parameter

    @property
    def name(self) -> str:
        return f"{self.kind} ({self.impl})"

    def states(self, param_bytes: int, n_tensors: int, adafactor_elems: int) -> int:
        """Bytes of the optimizer state (steady state, after the first step)."""
        scalar = 512 if self.device_type == "cuda" else 4  # CUDA caching allocator: 512-byte minimum block
        steps = n_tensors * scalar if self.kind != "sgd" and (self.step_on_device or self.device_type == "cpu") else 0
        if self.state_bytes is not None:
            return self.state_bytes + steps
        if self.kind == "adafactor":
            return int(adafactor_elems * 4) + steps
        return param_bytes * self.states_per_param + steps

    def step_temporaries(self, param_bytes: int, largest_param_bytes: int, largest_matrix_elems: int) -> int:
        """Bytes ``step()`` allocates on top of parameters, gradients and states."""
        if self.kind == "adafactor":
            return 2 * 4 * largest_matrix_elems  # fp32 row/column update of the largest matrix
        if self.kind == "sgd" and not self.weight_decay_temp:
            return 0
        bucket = self.bucket_bytes if self.bucket_bytes is not None else param_bytes
        largest = self.largest_bytes if self.largest_bytes is not None else largest_param_bytes
        loop = (1 if self.kind == "sgd" else 2 + self.weight_decay_temp) * largest
        return {"fused": 0, "foreach": bucket, "forloop": loop}[self.impl]

    def formula(self) -> tuple[str, str]:
        """(state formula, step-temporary formula) for the estimate's table."""
        st = {"adamw": f"{self.states_per_param} x params x param bytes (Adam m, v{', max v' if self.states_per_param > 2 else ''})",
              "sgd": "params x param bytes (momentum)", "adafactor": "(rows + cols) of each matrix x 4 B"}[self.kind]
        tmp = {"fused": "none (fused kernel)", "foreach": "one copy of the parameters (foreach sqrt of v)",
               "forloop": "the largest parameter x 2 (sqrt(v) and its quotient, one parameter at a time)"}[self.impl]
        return st, tmp


def from_name(name: str, device: str | torch.device = "cuda") -> OptimizerSpec:
    """``"adamw"`` is what ``torch.optim.AdamW(params)`` does by default on ``device`` (foreach on CUDA, the
    for-loop on the CPU); ``adamw_fused`` / ``adamw_foreach`` / ``adamw_forloop`` pin the implementation;
    ``sgd`` is momentum SGD with weight decay (as :func:`openautoglm.training.loop.build_optimizer` builds it)."""
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"optimizer={name!r}; accepted: {', '.join(NAMES)} or a torch.optim optimizer object")
    dev = torch.device(device)
    kind, impl = NAMES[name]
    impl = impl or default_impl(dev)
    states = {"adamw": 2, "sgd": 1, "adafactor": 0}[kind]
    return OptimizerSpec(kind, impl, states, step_on_device=impl == "fused", weight_decay_temp=kind == "sgd",
                         device_type=dev.type)


def from_optimizer(opt: torch.optim.Optimizer, device: str | torch.device | None = None) -> OptimizerSpec:
    """Read a live ``torch.optim`` optimizer: its class, ``fused``/``foreach``/``capturable``/``amsgrad``
    settings (``None`` resolved as torch resolves it), its parameter buckets and, once it has stepped, the
    bytes of its state tensors."""
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        kind = "adamw"
    elif isinstance(opt, torch.optim.SGD):
        kind = "sgd"
    elif hasattr(torch.optim, "Adafactor") and isinstance(opt, torch.optim.Adafactor):
        kind = "adafactor"
    else:
        raise TypeError(f"optimizer {type(opt).__name__} is not modelled; accepted: torch.optim.AdamW, Adam, SGD, "
                        f"Adafactor, or a name ({', '.join(NAMES)})")
    params = [p for g in opt.param_groups for p in g["params"]]
    if not params:
        raise ValueError("the optimizer holds no parameters")
    if device is None:
        device = next((p.device for p in params if not p.is_meta), torch.device("cuda"))
    dev = torch.device(device)
    g0 = opt.param_groups[0]
    fused, foreach = bool(g0.get("fused")), g0.get("foreach")
    impl = "fused" if fused else ("foreach" if foreach else "forloop" if foreach is False else default_impl(dev))
    if kind == "adafactor":
        impl = "foreach" if foreach else "forloop"
    capturable = bool(g0.get("capturable"))
    n_states = {"adamw": 2 + bool(g0.get("amsgrad")), "sgd": int(g0.get("momentum", 0) > 0), "adafactor": 0}[kind]
    buckets: dict[tuple, int] = {}
    for gi, g in enumerate(opt.param_groups):
        for p in g["params"]:
            key = (gi, p.device, p.dtype)
            buckets[key] = buckets.get(key, 0) + p.numel() * p.element_size()
    state_bytes = None
    if opt.state and all(p in opt.state for p in params):
        state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items()
                          if torch.is_tensor(t) and k != "step")
    largest = max(p.numel() * p.element_size() for p in params)
    wd = any(g.get("weight_decay", 0) for g in opt.param_groups)
    l2 = kind == "sgd" or (isinstance(opt, torch.optim.Adam) and not g0.get("decoupled_weight_decay", False)
                           and not isinstance(opt, torch.optim.AdamW))
    return OptimizerSpec(kind, impl, n_states, step_on_device=fused or capturable,
                         weight_decay_temp=bool(l2 and wd), device_type=dev.type, state_bytes=state_bytes,
                         bucket_bytes=max(buckets.values()), largest_bytes=largest)


def resolve(optimizer, device: str | torch.device | None) -> OptimizerSpec:
    """A name or a live optimizer -> :class:`OptimizerSpec` (``device`` default: CUDA, or the optimizer's)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return from_optimizer(optimizer, device)
    return from_name(optimizer, device or "cuda")


def check_device(device) -> None:
    """Raise ``ValueError`` unless ``device`` is ``None`` or something ``torch.device`` accepts."""
    if device is None:
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; accepted e.g. cuda, cuda:1, cpu") from None
