"""Reading a folder's ``config.json`` (causal LMs only) and resolving the requested dtype."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import _hf
from ..errors import CheckpointError, UnsupportedModelError


def _load_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"config.json in {path} is not valid JSON: {e}") from None
    if "model_type" not in raw:
        raise UnsupportedModelError(f"config.json in {path} has no 'model_type'; it is not a transformers model config")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UnsupportedModelError(f"cannot read config.json in {path}: {str(e).splitlines()[0]}") from None
    if not _hf.is_causal_lm_config(config):
        archs = getattr(config, "architectures", None) or [config.model_type]
        raise UnsupportedModelError(
            f"{path} holds a {', '.join(archs)} model, not a causal language model; "
            "openautoglm works on *ForCausalLM architectures (Llama, Mistral, Qwen2/3, ...)"
        )
    return config


def _resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        d = getattr(config, "dtype", None) or torch.float32
        return getattr(torch, d) if isinstance(d, str) else d
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(names)}, auto")
        return names[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype or a name, got {dtype!r}")
    return dtype
