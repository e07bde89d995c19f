"""Reading a folder's ``config.json`` (causal LMs only) and resolving the requested dtype."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import _hf
from ..errors import CheckpointError, UnsupportedModelError
from .registry import META_KEY

# The dimensions a causal LM config must state (first name of each tuple, or a family's alias): without them
# transformers falls back to class defaults (a 7B Llama) and the model silently is not the checkpoint's.
_REQUIRED_DIMS = (("vocab_size",), ("hidden_size", "n_embd", "d_model"), ("num_hidden_layers", "n_layer", "num_layers"),
                  ("num_attention_heads", "n_head", "num_heads"))


def _check_dims(raw: dict, where: str) -> None:
    src = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    for names in _REQUIRED_DIMS:
        present = [n for n in names if n in src or n in raw]
        if not present:
            raise CheckpointError(f"{where} lacks {names[0]!r}; a model config must state its dimensions "
                                  f"({', '.join(n[0] for n in _REQUIRED_DIMS)})")
        v = src.get(present[0], raw.get(present[0]))
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CheckpointError(f"{where}: {present[0]}={v!r} must be a positive integer")


def _known_model_types():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return CONFIG_MAPPING_NAMES


def _load_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    where = f"config.json in {path}"
    try:
        raw = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{where} is not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {where}: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} is a JSON {type(raw).__name__}, not an object")
    if "model_type" not in raw:
        raise UnsupportedModelError(f"{where} has no 'model_type'; it is not a transformers model config")
    if raw.get("auto_map") and not trust_remote_code and raw["model_type"] not in _known_model_types():
        raise UnsupportedModelError(
            f"{where} asks for custom code (model_type {raw['model_type']!r} with an auto_map); it is not run "
            "unless you pass trust_remote_code=True after reading that code")
    _check_dims(raw, where)
    meta = raw.get(META_KEY)
    if meta is not None:
        ts = meta.get("transforms") if isinstance(meta, dict) else None
        if not isinstance(ts, list) or not all(isinstance(t, dict) and isinstance(t.get("type"), str) for t in ts):
            raise CheckpointError(f"{where}: the {META_KEY!r} record is malformed (expected "
                                  '{"version": 1, "transforms": [{"type": ...}, ...]})')
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UnsupportedModelError(f"cannot read {where}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a malformed config
        raise CheckpointError(f"cannot read {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
            from None
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
