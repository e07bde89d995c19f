"""Weight sparsity: unstructured (per output row, per layer or global) and N:M semi-structured (2:4).

Scores come from :mod:`.importance` (magnitude, Wanda, Taylor, Fisher); the pruned weights are set to zero in
place, so the model keeps its dense shapes and dense storage: **dense storage saves no memory**. Memory is
saved only when the weights are stored sparse -- 2:4 through ``torch.sparse.to_sparse_semi_structured`` on a
GPU (see :mod:`.semi_structured`), unstructured as CSR or bitmask, whose sizes :func:`sparse_storage_bytes`
reports.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import _hf
from .._util import checks as C
from .._util.finite import check_weights
from ..hub import record_transform
from .importance import METHODS, calibration_ids, check_method, input_sq_norms, weight_grads, weight_scores

log = logging.getLogger(__name__)

SPARSITY_SCOPES = ("per_output", "per_layer", "global")
DEFAULT_TARGETS = ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.o_proj",
                   "*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj", "*.down", "*.up")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4) (keep N of every M consecutive input weights)."""
    if pattern == "unstructured":
        return None
    m = isinstance(pattern, str) and re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"unknown sparsity pattern {pattern!r}; accepted: unstructured, 2:4 (or N:M with N < M)")
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- pure math

def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive entries along the input dim: (out, in) -> bool."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"{n}:{m} sparsity needs the input dimension divisible by {m}; got {in_f}")
    groups = scores.reshape(out_f, in_f // m, m)
    idx = groups.topk(n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(out_f, in_f)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_output: bool) -> torch.Tensor:
    """Remove the lowest ``sparsity`` fraction of ``scores`` (out, in), per output row or over the matrix."""
    if per_output:
        k = int(round(sparsity * scores.shape[1]))
        mask = torch.ones_like(scores, dtype=torch.bool)
        if k:
            mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
        return mask
    k = int(round(sparsity * scores.numel()))
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[scores.flatten().topk(k, largest=False).indices] = False
    return mask.view_as(scores)


def sparse_storage_bytes(weight: torch.Tensor, pattern: str = "unstructured") -> dict[str, int]:
    """Bytes of ``weight`` (out, in) stored dense, as CSR (int32 indices), as bitmask + values, and, for 2:4,
    as semi-structured (half the values + 2-bit indices per kept value, the CUTLASS layout)."""
    e = weight.element_size()
    nnz = int((weight != 0).sum())
    out = {"dense": weight.numel() * e, "csr": nnz * (e + 4) + (weight.shape[0] + 1) * 4,
           "bitmask": nnz * e + (weight.numel() + 7) // 8}
    if pattern == "2:4":
        out["semi_structured_2:4"] = weight.numel() // 2 * e + weight.numel() // 2 * 2 // 8
    return out


# ----------------------------------------------------------------------------- config and surgery

@dataclass
class SparsityConfig:
    """``sparsity`` fraction of weights zeroed (ignored by N:M patterns, which set it to 1 - N/M).

    ``scope``: ``per_output`` compares weights within each output row (Wanda's choice), ``per_layer`` within
    each matrix, ``global`` across all targets; default per_output for wanda, per_layer otherwise.
    ``targets`` are module-name patterns with ``*`` wildcards; ``exclude`` removes matches.
    """

    sparsity: float = 0.5
    method: str = "wanda"
    pattern: str = "unstructured"
    scope: str | None = None
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude: list[str] = field(default_factory=list)
    n_samples: int = 32
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self):
        check_method(self.method, METHODS)
        nm = parse_pattern(self.pattern)
        if nm:
            self.sparsity = 1 - nm[0] / nm[1]
        self.sparsity = C.number("sparsity", self.sparsity, min=0.0, max=1.0, min_open=True, max_open=True)
        if self.scope is None:
            self.scope = "per_output" if self.method == "wanda" else "per_layer"
        C.choice("scope", self.scope, SPARSITY_SCOPES)
        if nm and self.scope == "global":
            raise ValueError("N:M patterns are local by construction; use scope per_output or per_layer")
        self.targets, self.exclude = list(C.patterns("targets", self.targets)), list(C.patterns("exclude", self.exclude))
        C.integer("n_samples", self.n_samples, min=1)
        C.integer("seq_len", self.seq_len, min=2)
        C.integer("seed", self.seed)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SparsityConfig:
        return cls(**d)


@dataclass
class SparsityResult:
    per_module: dict[str, float]  # fraction of zeros after pruning
    params_pruned: int
    params_targeted: int
    storage_bytes: dict[str, int]  # summed over targets: dense / csr / bitmask (/ 2:4)

    def to_dict(self) -> dict:
        return asdict(self)


def target_linears(model: nn.Module, targets: list[str], exclude: list[str] = ()) -> dict[str, nn.Linear]:
    """Linear modules of the decoder layers whose names match ``targets`` and not ``exclude``."""
    _hf.decoder_layers(model)  # fail early on unsupported models
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(fnmatch.fnmatch(name, t) for t in targets) \
                and not any(fnmatch.fnmatch(name, e) for e in exclude):
            out[name] = mod
    if not out:
        raise ValueError(f"no Linear module matches targets {targets}")
    return out


@torch.no_grad()
def sparsify(model: nn.Module, config: SparsityConfig | None = None, tokenizer=None, *,
             calib_ids: torch.Tensor | None = None, text: str | None = None, progress: bool = True,
             **kwargs) -> SparsityResult:
    """Zero the least important weights of the target Linears in place; returns per-module sparsity."""
    if config is not None and kwargs:
        raise TypeError("pass a SparsityConfig or keyword arguments, not both")
    c = config if config is not None else SparsityConfig(**kwargs)
    nm = parse_pattern(c.pattern)
    mods = target_linears(model, c.targets, c.exclude)
    check_weights(mods, "sparsity")
    bad = [n for n, m in mods.items() if nm and m.in_features % nm[1]]
    if bad:
        raise ValueError(f"{c.pattern} sparsity needs input dims divisible by {nm[1]}; {bad[0]} has "
                         f"{mods[bad[0]].in_features} -- exclude it (exclude=[...])")
    stats: dict[str, dict] = {n: {} for n in mods}
    if c.method != "magnitude":
        ids = calib_ids if calib_ids is not None else calibration_ids(
            tokenizer, text, n_samples=c.n_samples, seq_len=c.seq_len, seed=c.seed)
        if c.method == "wanda":
            stats = {n: {"in_sq_norm": v} for n, v in input_sq_norms(model, mods, ids, progress=progress).items()}
        else:
            with torch.enable_grad():
                g, g2 = weight_grads(model, mods, ids, progress=progress)
            stats = {n: {"grad": g[n], "grad_sq": g2[n]} for n in mods}
    scores = {n: weight_scores(m.weight, c.method, **stats[n]) for n, m in mods.items()}
    if c.scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = int(round(c.sparsity * flat.numel()))
        thresh = flat.kthvalue(max(k, 1)).values if k else -float("inf")
        masks = {n: s > thresh for n, s in scores.items()}
    elif nm:
        masks = {n: nm_mask(s, *nm) for n, s in scores.items()}
    else:
        masks = {n: unstructured_mask(s, c.sparsity, c.scope == "per_output") for n, s in scores.items()}
    per_module, pruned, storage = {}, 0, {}
    for n, m in mods.items():
        m.weight.mul_(masks[n].to(m.weight.device, m.weight.dtype))
        zeros = int((m.weight == 0).sum())
        per_module[n] = zeros / m.weight.numel()
        pruned += int((~masks[n]).sum())
        for k, v in sparse_storage_bytes(m.weight, c.pattern).items():
            storage[k] = storage.get(k, 0) + v
    record_transform(model, "sparsity", {"config": c.to_dict()})
    total = sum(m.weight.numel() for m in mods.values())
    log.info("sparsity %s %s (%s): zeroed %d of %d weights in %d modules", c.pattern, c.method, c.scope,
             pruned, total, len(mods))
    return SparsityResult(per_module=per_module, params_pruned=pruned, params_targeted=total, storage_bytes=storage)


def check_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive input weights of (out, in) ``weight`` has <= ``n`` non-zeros."""
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, m) != 0).sum(-1) <= n).all())
