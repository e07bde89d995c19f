"""A small, predictable training loop for causal LMs.

``train(model, data, TrainConfig(...), eval_data=...) -> TrainResult``

* mixed precision: ``amp="bf16"`` (autocast, fp32 master weights), ``amp="fp16"`` (autocast + GradScaler), or
  ``amp="none"`` (train in the parameters' own dtype). Under autocast the parameters are fp32, so RMSNorm/LayerNorm
  and the loss run in fp32.
* gradient accumulation over ``grad_accum`` micro-batches of ``micro_batch`` windows of ``seq_len`` tokens;
* activation checkpointing (``grad_checkpointing=True``: non-reentrant, one checkpoint per decoder layer);
* linear warm-up then cosine decay to ``min_lr_ratio x lr``; gradient clipping;
* a progress bar, periodic evaluation on held-out ids, and safetensors checkpoints written atomically into
  ``out_dir/checkpoint`` from which an interrupted run resumes (same batches, same schedule).

The memory this loop uses is what :func:`openautoglm.memory.estimate_memory` models for ``mode="train"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _hf
from .._util import checks as C
from .._util.atomic import atomic_file
from .._util.finite import NonFiniteError
from . import checkpoints as io

log = logging.getLogger(__name__)

AMP_MODES = ("bf16", "fp16", "none")
OPTIMIZERS = ("adamw_fused", "adamw", "adamw_foreach", "adamw_forloop", "sgd", "adafactor")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train` (validated on construction, JSON round-trip via to_dict/from_dict)."""

    steps: int = 100                 # optimizer steps
    micro_batch: int = 8             # sequences per forward/backward
    grad_accum: int = 1              # micro-batches per optimizer step
    seq_len: int = 512               # tokens per sequence
    lr: float = 3e-4
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.1        # not applied to 1-D parameters (norms, biases)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0           # 0 disables clipping
    optimizer: str = "adamw_fused"   # adamw_fused; adamw (torch's default: foreach on CUDA), adamw_foreach,
                                     # adamw_forloop; sgd (momentum 0.9); adafactor
    amp: str = "bf16"                # bf16 | fp16 | none
    grad_checkpointing: bool = False
    eval_every: int = 0              # optimizer steps between evaluations (0: only at the end if eval data given)
    eval_batches: int = 8            # micro-batches per evaluation
    save_every: int = 0              # optimizer steps between checkpoints (0: only at the end if out_dir given)
    out_dir: str | None = None
    resume: bool = True              # continue from out_dir/checkpoint when it exists
    seed: int = 0
    progress: bool = True
    log_every: int = 10
    keep_fp32: bool = False          # under AMP, leave the model in fp32 after training (default: its own dtype)

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "grad_accum", "seq_len", "eval_batches", "log_every"):
            C.integer(f"TrainConfig.{name}", getattr(self, name), min=1)
        for name in ("warmup_steps", "eval_every", "save_every"):
            C.integer(f"TrainConfig.{name}", getattr(self, name), min=0)
        C.integer("TrainConfig.seed", self.seed)
        self.lr = C.number("TrainConfig.lr", self.lr, min=0.0, min_open=True)
        self.min_lr_ratio = C.number("TrainConfig.min_lr_ratio", self.min_lr_ratio, min=0.0, max=1.0)
        self.weight_decay = C.number("TrainConfig.weight_decay", self.weight_decay, min=0.0)
        self.grad_clip = C.number("TrainConfig.grad_clip", self.grad_clip, min=0.0)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas={self.betas!r} must be two numbers in [0, 1)")
        self.betas = tuple(C.number("TrainConfig.betas", b, min=0.0, max=1.0, max_open=True)  # type: ignore[assignment]
                           for b in self.betas)
        C.choice("TrainConfig.amp", self.amp, AMP_MODES)
        C.choice("TrainConfig.optimizer", self.optimizer, OPTIMIZERS)
        for name in ("grad_checkpointing", "resume", "progress", "keep_fp32"):
            C.boolean(f"TrainConfig.{name}", getattr(self, name))
        if self.out_dir is not None:
            self.out_dir = C.path("TrainConfig.out_dir", self.out_dir)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; accepted: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainResult:
    """What :func:`train` did: losses per optimizer step, evaluations, throughput and peak memory."""

    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)   # {"step", "loss", "perplexity"}
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_memory_bytes: int | None = None   # torch.cuda.max_memory_allocated on CUDA, else None
    resumed_from: int = 0                  # optimizer step the run resumed at (0: fresh)
    checkpoint: str | None = None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "final_loss": self.final_loss}


# ----------------------------------------------------------------------------- pieces


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio*lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused; torch's default implementation; foreach; for-loop), SGD with momentum 0.9, or Adafactor;
    no decay on 1-D tensors. The names are those of :func:`openautoglm.memory.estimate_memory`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters with requires_grad=True; nothing to train")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    impl = {"adamw_fused": {"fused": True}, "adamw": {}, "adamw_foreach": {"foreach": True},
            "adamw_forloop": {"foreach": False}}
    if cfg.optimizer in impl:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **impl[cfg.optimizer])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.Adafactor(groups, lr=cfg.lr)


def to_ids(data, tokenizer=None) -> torch.Tensor:
    """A 1-D LongTensor of token ids from ids (tensor/list) or text (needs ``tokenizer``)."""
    if isinstance(data, str):
        if tokenizer is None:
            raise TypeError("training on text needs a tokenizer: train(model, text, cfg, tokenizer=tok)")
        data = tokenizer(data, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.as_tensor(data, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens of training data, got {ids.numel()}")
    return ids


def batch_at(ids: torch.Tensor, step: int, micro: int, cfg: TrainConfig) -> torch.Tensor:
    """The micro-batch ``micro`` of optimizer step ``step``: (micro_batch, seq_len) random windows, deterministic
    in (seed, step, micro) so a resumed run sees the same data."""
    n = min(cfg.seq_len, ids.numel())
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro)
    starts = torch.randint(0, ids.numel() - n + 1, (cfg.micro_batch,), generator=g)
    return torch.stack([ids[s:s + n] for s in starts.tolist()])


def autocast_ctx(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def prepare_model(model: nn.Module, cfg: TrainConfig) -> None:
    """Training mode, no KV cache, fp32 master weights under AMP, activation checkpointing when asked."""
    model.train()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    if cfg.amp != "none":
        low = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != torch.float32]
        if low:
            log.info("amp=%s keeps fp32 master weights: casting %d parameters to float32", cfg.amp, len(low))
            model.float()
    if cfg.grad_checkpointing:
        _hf.enable_activation_checkpointing(model)


@torch.no_grad()
def evaluate_loss(model: nn.Module, ids: torch.Tensor, cfg: TrainConfig) -> dict[str, float]:
    """Mean next-token loss over ``eval_batches`` fixed micro-batches of held-out ids."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ecfg = dataclasses.replace(cfg, seed=cfg.seed + 7919)
    total = 0.0
    for i in range(cfg.eval_batches):
        x = batch_at(ids, 0, i, ecfg).to(device)
        with autocast_ctx(device, cfg.amp):
            total += float(model(input_ids=x, labels=x, use_cache=False).loss)
    model.train(was_training)
    loss = total / cfg.eval_batches
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# ----------------------------------------------------------------------------- the loop


def train(model: nn.Module, data, config: TrainConfig | None = None, *, eval_data=None, tokenizer=None,
          callback=None) -> TrainResult:
    """Train ``model`` in place on ``data`` (token ids, 1-D, or text with ``tokenizer``).

    Under AMP a half-precision model trains with fp32 master weights and is cast back to its dtype at the
    end (``keep_fp32=True`` keeps fp32); checkpoints hold the fp32 weights so a resumed run is exact.

    Parameters
    ----------
    model : a transformers causal LM (``model(input_ids=, labels=)`` returns ``.loss``), on its target device.
    data : 1-D token ids (tensor or list) or a string (then ``tokenizer`` is required).
    config : :class:`TrainConfig`; default ``TrainConfig()``.
    eval_data : held-out ids or text, evaluated every ``eval_every`` steps and at the end.
    callback : optional ``fn(step, loss)`` called after each optimizer step.

    Returns
    -------
    TrainResult with the loss of every optimizer step (mean over its micro-batches).
    """
    cfg = config or TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    ids = to_ids(data, tokenizer)
    eval_ids = to_ids(eval_data, tokenizer) if eval_data is not None else None
    device = next(model.parameters()).device
    if cfg.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("amp='bf16' is not supported on this GPU; use amp='fp16'")
    orig_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    prepare_model(model, cfg)
    opt = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    out = Path(cfg.out_dir) if cfg.out_dir else None
    result = TrainResult(steps=0, tokens=0)
    start = 0
    if out is not None and cfg.resume and io.has_checkpoint(out):
        state = io.load_checkpoint(out, model, opt, scaler)
        _check_resumable(state.get("config") or {}, cfg, out)
        start = result.resumed_from = int(state["step"])
        result.losses = list(state.get("losses", []))
        result.evals = list(state.get("evals", []))
        log.info("resumed from %s at step %d", out / io.CKPT, start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = _progress(cfg, start)
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        total = 0.0
        for micro in range(cfg.grad_accum):
            x = batch_at(ids, step, micro, cfg).to(device, non_blocking=True)
            with autocast_ctx(device, cfg.amp):
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            scaler.scale(loss / cfg.grad_accum).backward()
            total += float(loss.detach())
        if not scaler.is_enabled() and not math.isfinite(total):  # (fp16's GradScaler skips such steps itself)
            raise NonFiniteError(f"step {step + 1}: the training loss is {total / cfg.grad_accum:g}; stopped before the "
                                 "optimizer step so the weights stay finite"
                                 + (f" (the last checkpoint in {out} is intact)" if out is not None else "")
                                 + " -- lower lr, use amp='bf16' or 'none', or check the data")
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not scaler.is_enabled() and not torch.isfinite(norm):
                raise NonFiniteError(f"step {step + 1}: the gradient norm is {float(norm):g}; stopped before the "
                                     "optimizer step so the weights stay finite")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        result.losses.append(total / cfg.grad_accum)
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}", lr=f"{lr_at(step, cfg):.2e}")
        elif done % cfg.log_every == 0:
            log.info("step %d/%d loss %.4f", done, cfg.steps, result.losses[-1])
        if callback is not None:
            callback(done, result.losses[-1])
        if eval_ids is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            result.evals.append({"step": done, **evaluate_loss(model, eval_ids, cfg)})
            log.info("step %d eval loss %.4f", done, result.evals[-1]["loss"])
        if out is not None and cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            io.save_checkpoint(out, model, opt, scaler, {"step": done, "losses": result.losses,
                                                          "evals": result.evals, "config": cfg.to_dict()})
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    if eval_ids is not None and not (result.evals and result.evals[-1]["step"] == cfg.steps):
        result.evals.append({"step": cfg.steps, **evaluate_loss(model, eval_ids, cfg)})
    run_steps = cfg.steps - start
    result.steps = cfg.steps
    result.tokens = cfg.steps * cfg.tokens_per_step
    result.elapsed_s = elapsed
    result.tokens_per_s = run_steps * cfg.tokens_per_step / elapsed if elapsed > 0 and run_steps else 0.0
    if device.type == "cuda":
        result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    if out is not None:
        io.save_checkpoint(out, model, opt, scaler, {"step": cfg.steps, "losses": result.losses,
                                                      "evals": result.evals, "config": cfg.to_dict()})
        result.checkpoint = str(out / io.CKPT)
        with atomic_file(out / "train_result.json") as fh:
            fh.write(json.dumps(result.to_dict(), indent=2))
    model.eval()
    if orig_dtype is not None and orig_dtype != torch.float32 and cfg.amp != "none" and not cfg.keep_fp32:
        model.to(orig_dtype)  # the fp32 master weights were for training; hand the model back in its dtype
    return result


# Fields whose change alters the trajectory of a resumed run: refused. ``steps`` moves the cosine schedule (warned).
_TRAJECTORY = ("micro_batch", "grad_accum", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas",
               "grad_clip", "optimizer", "amp", "seed")


def _check_resumable(saved: dict, cfg: TrainConfig, out: Path) -> None:
    now = cfg.to_dict()
    diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in _TRAJECTORY if k in saved and saved[k] != now[k]]
    if diff:
        raise ValueError(f"the checkpoint in {out} was trained with other settings ({'; '.join(diff)}); resuming would "
                         "not continue that run -- use the same settings, another out_dir, or resume=False (CLI: --overwrite)")
    if saved.get("steps") not in (None, cfg.steps):
        log.warning("resuming with steps=%d (the checkpoint's run had %s): the learning-rate schedule changes",
                    cfg.steps, saved.get("steps"))


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of transformers
        return None
    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
