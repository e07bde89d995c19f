"""Low-rank projections: replace ``Linear(in, out)`` by ``Linear(in, r)`` then ``Linear(r, out)``.

Plain truncated SVD keeps the top singular directions of ``W``. Activation-aware SVD (as SVD-LLM / ASVD)
minimises the output error on calibration inputs instead: with ``X^T X = L L^T`` (Cholesky of the input
covariance), ``||(W - W') X^T||_F = ||(W - W') L||_F``, so it truncates the SVD of ``W L`` and maps back with
``L^{-1}``. Rank per module comes from the kept energy (sum of squared singular values) or a parameter ratio;
a module is factorized only where ``r (in + out) < in * out``, i.e. where it saves memory.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._util import checks as C
from .._util.finite import InputWatch, check_weights
from .._util.modules import set_module
from ..hub import record_transform
from .importance import calibration_ids
from .sparsity import DEFAULT_TARGETS, target_linears

log = logging.getLogger(__name__)

LOWRANK_METHODS = ("activation", "plain")


# ----------------------------------------------------------------------------- pure math

def whitening_factor(cov: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower-triangular ``L`` with ``L L^T = cov + damp * mean(diag) * I``; cov: (in, in) -> (in, in) float64."""
    c = cov.double()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    lam = damp * c.diagonal().mean().clamp_min(1e-12)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(c + lam * eye)
        if int(info) == 0:
            return L
        lam = lam * 10
    raise ValueError("input covariance is not positive definite even with damping")


def singular_values(weight: torch.Tensor, L: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of ``W`` (out, in), or of ``W L`` when a whitening factor is given."""
    w = weight.detach().double()
    return torch.linalg.svdvals(w @ L if L is not None else w)


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest rank whose squared singular values hold ``energy`` of the total."""
    e = s.double().pow(2)
    frac = e.cumsum(0) / e.sum().clamp_min(1e-300)
    return int(torch.searchsorted(frac, torch.tensor(energy, dtype=frac.dtype)).item()) + 1


def low_rank_factors(weight: torch.Tensor, rank: int, L: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up (out, r), down (r, in))`` with ``up @ down ~ W``; whitened (activation-aware) when ``L`` is given."""
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank={rank} must be in [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight")
    w = weight.detach().double()
    U, S, Vh = torch.linalg.svd(w @ L if L is not None else w, full_matrices=False)
    sq = S[:rank].sqrt()
    up = U[:, :rank] * sq[None, :]
    down = sq[:, None] * Vh[:rank]
    if L is not None:  # down @ L^{-1}: solve X L = down  <=>  L^T X^T = down^T
        down = torch.linalg.solve_triangular(L.T, down.T, upper=True).T
    return up, down


# ----------------------------------------------------------------------------- module

class LowRankLinear(nn.Module):
    """``x -> up(down(x))``; x: (..., in_features) -> (..., out_features); ``rank`` inner features."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def tp_granularity(self, dim: str) -> int:
        """Tensor parallelism (:mod:`openautoglm.parallel`): any feature boundary is a valid cut."""
        return 1

    def tp_slices(self, dim: str, start: int, stop: int) -> dict[str, tuple[int, int, int] | None]:
        """Output cut: rows of ``up`` (and its bias); input cut: columns of ``down``. The rank-r core is kept whole."""
        if dim == "out":
            out = {"up.weight": (0, start, stop), "down.weight": None}
            if self.up.bias is not None:
                out["up.bias"] = (0, start, stop)
            return out
        out = {"down.weight": (1, start, stop), "up.weight": None}
        if self.up.bias is not None:
            out["up.bias"] = None
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_with_low_rank(model: nn.Module, name: str, up: torch.Tensor, down: torch.Tensor) -> LowRankLinear:
    lin = model.get_submodule(name)
    new = LowRankLinear(lin.in_features, lin.out_features, up.shape[1], lin.bias is not None,
                        device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.up.weight.copy_(up)
        new.down.weight.copy_(down)
        if lin.bias is not None:
            new.up.bias.copy_(lin.bias)
    set_module(model, name, new)
    return new


# ----------------------------------------------------------------------------- config and verb

@dataclass
class LowRankConfig:
    """Exactly one of ``energy`` (fraction of squared singular values kept, in (0, 1]) or ``param_ratio``
    (fraction of each module's parameters kept, in (0, 1)); default ``energy=0.9``. Ranks are rounded up to a
    multiple of ``rank_multiple``."""

    energy: float | None = None
    param_ratio: float | None = None
    method: str = "activation"
    targets: list[str] = field(default_factory=lambda: [t for t in DEFAULT_TARGETS if t not in ("*.down", "*.up")])
    exclude: list[str] = field(default_factory=list)
    damp: float = 0.01
    rank_multiple: int = 16  # ranks aligned for tensor cores and the quantizers (multiples of 16)
    n_samples: int = 32
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self):
        C.choice("method", self.method, LOWRANK_METHODS)
        if self.energy is None and self.param_ratio is None:
            self.energy = 0.9
        if (self.energy is None) == (self.param_ratio is None):
            raise ValueError("give exactly one of energy or param_ratio")
        self.energy = C.number("energy", self.energy, min=0.0, max=1.0, min_open=True, optional=True)
        self.param_ratio = C.number("param_ratio", self.param_ratio, min=0.0, max=1.0, min_open=True, max_open=True,
                                    optional=True)
        self.damp = C.number("damp", self.damp, min=0.0)
        C.integer("rank_multiple", self.rank_multiple, min=1)
        self.targets, self.exclude = list(C.patterns("targets", self.targets)), list(C.patterns("exclude", self.exclude))
        C.integer("n_samples", self.n_samples, min=1)
        C.integer("seq_len", self.seq_len, min=2)
        C.integer("seed", self.seed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LowRankResult:
    ranks: dict[str, int]  # factorized module -> rank
    skipped: dict[str, str]  # module -> why it was left dense
    params_before: int
    params_after: int
    rel_errors: dict[str, float]  # ||W - W'||_F / ||W||_F (plain weight error, both methods)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def input_covariances(model: nn.Module, modules: dict[str, nn.Linear], ids: torch.Tensor, *, batch_size: int = 4,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """``X^T X`` of each module's inputs over the calibration tokens, ``name -> (in, in)`` float64."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    acc = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device) for n, m in modules.items()}
    watch, batch = InputWatch("low-rank calibration (input covariance)"), None

    def hook(name):
        def fn(mod, args):
            watch.see(name, args[0])
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc[name].addmm_(x.T, x)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for i in tqdm(range(0, ids.shape[0], batch_size), desc="covariance", unit="batch", disable=not progress):
            batch = ids[i : i + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            if watch.bad:
                break
    finally:
        for h in handles:
            h.remove()
    watch.raise_if_bad(model, batch)
    return acc


@torch.no_grad()
def low_rank(model: nn.Module, config: LowRankConfig | None = None, tokenizer=None, *,
             calib_ids: torch.Tensor | None = None, text: str | None = None, progress: bool = True,
             **kwargs) -> LowRankResult:
    """Factorize the target Linears in place where that saves parameters; returns ranks and errors."""
    if config is not None and kwargs:
        raise TypeError("pass a LowRankConfig or keyword arguments, not both")
    c = config if config is not None else LowRankConfig(**kwargs)
    mods = target_linears(model, c.targets, c.exclude)
    check_weights(mods, "low-rank")
    p0 = sum(p.numel() for p in model.parameters())
    covs = {}
    if c.method == "activation":
        ids = calib_ids if calib_ids is not None else calibration_ids(
            tokenizer, text, n_samples=c.n_samples, seq_len=c.seq_len, seed=c.seed)
        covs = input_covariances(model, mods, ids, progress=progress)
    ranks, skipped, errors = {}, {}, {}
    for name, lin in mods.items():
        out_f, in_f = lin.weight.shape
        L = whitening_factor(covs[name], c.damp) if name in covs else None
        if c.param_ratio is not None:
            r = int(c.param_ratio * out_f * in_f / (out_f + in_f))
            r = max(c.rank_multiple, r - r % c.rank_multiple)
        else:
            r = rank_for_energy(singular_values(lin.weight, L), c.energy)
            r = -(-r // c.rank_multiple) * c.rank_multiple
        if r * (in_f + out_f) >= in_f * out_f or r > min(out_f, in_f):
            skipped[name] = f"rank {r} would not save parameters ({r * (in_f + out_f)} >= {in_f * out_f})"
            continue
        up, down = low_rank_factors(lin.weight, r, L)
        w = lin.weight.double()
        errors[name] = float((w - up @ down).norm() / w.norm())
        replace_with_low_rank(model, name, up, down)
        ranks[name] = r
    for name, why in skipped.items():
        log.info("low-rank: left %s dense: %s", name, why)
    record_transform(model, "low_rank", {"ranks": ranks, "config": c.to_dict()})
    return LowRankResult(ranks=ranks, skipped=skipped, params_before=p0,
                         params_after=sum(p.numel() for p in model.parameters()), rel_errors=errors)


def rebuild_low_rank(model: nn.Module, spec: dict) -> None:
    """Loader hook: swap the recorded modules for empty :class:`LowRankLinear` of the recorded ranks."""
    for name, r in spec.get("ranks", {}).items():
        lin = model.get_submodule(name)
        set_module(model, name, LowRankLinear(lin.in_features, lin.out_features, int(r), lin.bias is not None,
                                               device=lin.weight.device, dtype=lin.weight.dtype))
