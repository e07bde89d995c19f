"""Recovery fine-tune after pruning: a short causal-LM fine-tune on training text, full or LoRA (peft).

Runs through the project's training loop :func:`openautoglm.training.loop.train` (AdamW, warm-up + cosine, clipping,
AMP on GPU). Weights zeroed by sparsity stay zero: their masks are re-applied after every optimizer step
(and after merging LoRA adapters). Train on the *training* split, never on the held-out text you evaluate on.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..training.loop import TrainConfig, train

log = logging.getLogger(__name__)

RECOVERY_METHODS = ("full", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RecoveryConfig:
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    seq_len: int = 256
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    method: str = "full"
    lora_rank: int = 16
    lora_alpha: int = 32
    keep_sparsity: bool = True
    amp: str = "auto"  # auto: bf16 autocast on CUDA, none (the parameters' dtype) on CPU
    seed: int = 0

    def __post_init__(self):
        if self.method not in RECOVERY_METHODS:
            raise ValueError(f"unknown recovery method {self.method!r}; accepted: {', '.join(RECOVERY_METHODS)}")
        for name in ("steps", "batch_size", "lora_rank"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"unknown amp {self.amp!r}; accepted: auto, bf16, fp16, none")
        if self.seq_len < 2 or self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2, lr={self.lr} > 0, warmup={self.warmup} >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecoveryResult:
    losses: list[float] = field(default_factory=list)  # training loss per step
    seconds: float = 0.0
    trainer: str = "openautoglm.training.loop"
    method: str = "full"

    def to_dict(self) -> dict:
        return asdict(self)


def _sparsity_masks(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """Masks of the Linear weights that are at least 1% exact zeros (i.e. were sparsified)."""
    masks = {}
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod.weight.dim() == 2:
            nz = mod.weight.detach() != 0
            if (~nz).float().mean() >= 0.01:
                masks[mod.weight] = nz
    return masks


def recover(model: nn.Module, token_ids: torch.Tensor | None = None, *, tokenizer=None, text: str | None = None,
            config: RecoveryConfig | None = None, progress: bool = True, **kwargs) -> RecoveryResult:
    """Fine-tune ``model`` in place on ``token_ids`` (1-D) or ``text``; returns the loss curve."""
    if config is not None and kwargs:
        raise TypeError("pass a RecoveryConfig or keyword arguments, not both")
    c = config if config is not None else RecoveryConfig(**kwargs)
    if token_ids is None:
        if text is None or tokenizer is None:
            raise ValueError("recovery needs training data: token_ids, or text with a tokenizer "
                             "(use the training split, not the held-out text you evaluate on)")
        token_ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    token_ids = torch.as_tensor(token_ids).flatten()
    if token_ids.numel() <= c.seq_len:
        raise ValueError(f"training text has {token_ids.numel()} tokens; need more than seq_len={c.seq_len}")
    if c.method == "lora" and importlib.util.find_spec("peft") is None:
        raise ImportError("LoRA recovery needs peft: pip install 'openautoglm[lora]'")
    masks = _sparsity_masks(model) if c.keep_sparsity else {}
    train_model = model
    if c.method == "lora":
        from peft import LoraConfig, get_peft_model

        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        train_model = get_peft_model(model, LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha,
                                                       target_modules=[t for t in LORA_TARGETS if t in present]))
    result = _train(train_model, token_ids, c, masks, progress)
    if c.method == "lora":
        train_model.merge_and_unload()
        _apply_masks(masks)
    model.eval()
    return result


@torch.no_grad()
def _apply_masks(masks: dict[nn.Parameter, torch.Tensor]) -> None:
    for p, m in masks.items():
        p.mul_(m.to(p.dtype))


def _train(model: nn.Module, token_ids: torch.Tensor, c: RecoveryConfig,
           masks: dict[nn.Parameter, torch.Tensor], progress: bool) -> RecoveryResult:
    device = next(model.parameters()).device
    amp = c.amp if c.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    cfg = TrainConfig(steps=c.steps, micro_batch=c.batch_size, seq_len=c.seq_len, lr=c.lr, min_lr_ratio=0.0,
                      warmup_steps=c.warmup, weight_decay=c.weight_decay, grad_clip=c.grad_clip, amp=amp,
                      seed=c.seed, progress=progress)
    out = train(model, token_ids, cfg, callback=lambda step, loss: _apply_masks(masks))
    return RecoveryResult(losses=list(out.losses), seconds=out.elapsed_s, method=c.method)
