"""Model names -> folders, loading and atomic saving.

``from_pretrained`` accepts a shipped model name (``open-autoglm-base``) or a local Hugging Face folder
(``config.json`` + safetensors, sharded or not). Compressed checkpoints record what was done to them in
``config.json`` under ``"openautoglm": {"version": 1, "transforms": [...]}``; each transform type has a
*rebuilder* registered with :func:`register_rebuilder` that reshapes the freshly built (empty, meta-device)
model -- swap in quantized modules, drop pruned heads -- before the saved tensors are assigned. So a
compressed model reloads without the user repeating the recipe and without materializing full-precision
weights.

One file per job: ``names`` (names -> folders), ``validate`` (safetensors headers, shard indexes),
``config`` (config.json, dtypes), ``load`` (building and filling models), ``save`` (atomic saving),
``registry`` (the transform log and its rebuilders), ``plugins`` (where the capabilities above the hub plug
into loading: rebuilders, quantize on load, model-ready callbacks).
"""

from __future__ import annotations

from . import plugins
from .lazy import OUTER, LoadHook, stream_into
from .load import (
    PICKLE_FILES,
    AutoModelForCausalLM,
    AutoTokenizer,
    build_empty,
    empty_model,
    from_pretrained,
    has_tokenizer,
    load_tokenizer,
    open_checkpoint,
)
from .names import PACKAGE_DIR, SHIPPED_MODELS, looks_like_hub_id, resolve_model_path, shipped_models
from .reader import CheckpointReader
from .registry import (
    FORMAT_VERSION,
    META_KEY,
    Rebuilder,
    applied_transforms,
    apply_rebuilders,
    record_transform,
    register_rebuilder,
    registered_transforms,
)
from .save import TOKENIZER_FILES, check_output_dir, save_pretrained
from .validate import (
    CheckpointTensors,
    check_against_model,
    checkpoint_tensors,
    validate_safetensors,
    weight_files,
)

__all__ = [
    "AutoModelForCausalLM", "AutoTokenizer", "FORMAT_VERSION", "META_KEY", "PACKAGE_DIR", "PICKLE_FILES",
    "Rebuilder", "SHIPPED_MODELS", "TOKENIZER_FILES", "applied_transforms", "empty_model", "from_pretrained",
    "load_tokenizer", "record_transform", "register_rebuilder", "registered_transforms", "resolve_model_path",
    "check_output_dir", "save_pretrained", "shipped_models", "validate_safetensors", "weight_files", "CheckpointTensors",
    "checkpoint_tensors", "check_against_model", "apply_rebuilders", "plugins", "OUTER", "LoadHook", "stream_into",
    "build_empty", "has_tokenizer", "open_checkpoint", "looks_like_hub_id", "CheckpointReader",
]
