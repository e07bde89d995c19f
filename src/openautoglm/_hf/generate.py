"""transformers' handling of ``generate`` arguments, for routing ``model.generate`` (part of the transformers adapter).

:func:`resolve` binds one ``model.generate(...)`` call and merges it with the model's ``generation_config``
through transformers' own steps -- ``_prepare_generation_config`` (kwargs over ``generation_config`` over the
model's config over the global defaults), ``_prepare_generated_length`` (``max_new_tokens`` / ``max_length``,
``min_new_tokens`` / ``min_length``), ``_prepare_special_tokens`` (EOS as a list, pad defaulting to the first EOS)
and ``_prepare_attention_mask_for_generation`` (the mask transformers infers from pad tokens) -- so the decode
sees exactly the parameters transformers' loop would. The result is a :class:`GenerateCall`, or a string saying
why only transformers' loop can serve the call (beams, processors, padding, outputs other than the token ids...).
These private methods are unchanged from transformers 5.17 to 5.24; if one is missing or fails, the caller falls
back to transformers' ``generate``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field

import torch

# generate() arguments that only transformers' loop serves when given (not None / non-empty)
_CALL_ARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model", "streamer",
              "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "synced_gpus")
_OUTPUTS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states")
_HANDLED = {"max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k",
            "top_p", "eos_token_id", "pad_token_id", "cache_implementation", "use_cache", "num_return_sequences",
            *_OUTPUTS}
# no effect on one greedy or sampled sequence per prompt (beam / assistant / cache-sizing / compile options; the
# generation mode check below catches beams, contrastive search and assisted decoding themselves)
_INERT = {"bos_token_id", "decoder_start_token_id", "compile_config", "cache_config", "max_cache_len",
          "prefill_chunk_size", "early_stopping", "length_penalty", "num_beams", "num_beam_groups", "penalty_alpha",
          "diversity_penalty", "low_memory", "num_assistant_tokens", "num_assistant_tokens_schedule",
          "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "max_matching_ngram_size",
          "continuous_batching_config", "transformers_version"}
_SAMPLING_ONLY = {"min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"}  # warpers applied only when sampling
_LOGGERS = ("utils", "configuration_utils")
_NEUTRAL = {"guidance_scale": 1.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0}


@dataclass
class GenerateCall:
    """One ``generate`` call the static-cache decode serves exactly: ``input_ids (batch, prompt)`` as given."""

    input_ids: torch.Tensor
    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float
    eos: list[int] | None
    pad: int | None
    held: list[logging.LogRecord] = field(default_factory=list, repr=False)

    def log_held(self) -> None:
        """Emit the warnings transformers logged while the call was resolved."""
        for r in self.held:
            logging.getLogger(r.name).handle(r)
        self.held = []


class _Held(logging.Filter):
    """Holds transformers' log records back while resolving: they are emitted once, by whichever path runs."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def resolve(model, args: tuple, kwargs: dict) -> GenerateCall | str:
    """The effective parameters of ``model.generate(*args, **kwargs)``, or why only transformers' loop serves it.

    transformers' warnings about the arguments (lengths, pad / attention mask) are held in the result: the router
    logs them (:meth:`GenerateCall.log_held`) when it decodes; on a fallback transformers' own ``generate`` logs
    them."""
    held, loggers = _Held(), [logging.getLogger(f"transformers.generation.{m}") for m in _LOGGERS]
    for lg in loggers:
        lg.addFilter(held)
    try:
        out = _resolve(model, args, kwargs)
    finally:
        for lg in loggers:
            lg.removeFilter(held)
    if isinstance(out, GenerateCall):
        out.held = held.records
    return out


def _resolve(model, args: tuple, kwargs: dict) -> GenerateCall | str:
    from transformers import GenerationMixin

    if type(model).generate is not GenerationMixin.generate:
        return f"{type(model).__name__} overrides generate"
    try:
        bound = inspect.signature(GenerationMixin.generate).bind(model, *args, **kwargs)
    except TypeError as e:
        return f"arguments do not match generate's signature ({e})"
    a = dict(bound.arguments)
    kw = dict(a.pop("kwargs", {}))
    for name in _CALL_ARGS:
        v = a.get(name)
        if v is not None and not (name in ("logits_processor", "stopping_criteria") and len(v) == 0) and v is not False:
            return f"{name} given"
    kw.pop("tokenizer", None)  # only used by stop_strings / token_healing, which fall back below
    kw.pop("trust_remote_code", None)
    ids = a.get("inputs")
    if ids is None:
        ids = kw.pop("input_ids", None)
    elif "input_ids" in kw:
        return "both inputs and input_ids given"
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.long, torch.int):
        return "input_ids is not a non-empty (batch, prompt) integer tensor" + ("" if ids is not None else " (none given)")
    mask = kw.pop("attention_mask", None)
    gcfg = a.get("generation_config")
    mine = model.generation_config
    default_max = kw.get("max_length") is None and (gcfg is None or gcfg.max_length is None) and mine.max_length is None
    default_min = kw.get("min_length") is None and (gcfg is None or gcfg.min_length is None) and mine.min_length is None
    cfg, model_kwargs = model._prepare_generation_config(gcfg, **kw)
    if model_kwargs:
        return f"model inputs other than input_ids / attention_mask: {sorted(model_kwargs)}"
    why = _unsupported_config(cfg)
    if why:
        return why
    B, P = ids.shape
    model._prepare_generated_length(cfg, has_default_max_length=default_max, has_default_min_length=default_min,
                                    model_input_name="input_ids", input_ids_length=P, inputs_tensor=ids)
    if cfg.max_length - P < 1:
        return f"max_length {cfg.max_length} leaves no new token after a prompt of {P}"
    model._validate_generated_length(cfg, P, default_max)  # transformers' warnings on lengths
    model._prepare_special_tokens(cfg, mask is not None, device=ids.device, batch_size=B)
    if mask is None:
        mask = model._prepare_attention_mask_for_generation(ids, cfg, {})
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        return f"attention_mask of shape {tuple(getattr(mask, 'shape', ()))} for input_ids {tuple(ids.shape)}"
    if not bool((mask == 1).all()):
        return "attention_mask has padding (zeros)"
    eos = None if cfg._eos_token_tensor is None else [int(i) for i in cfg._eos_token_tensor.tolist()]
    pad = None if cfg._pad_token_tensor is None else int(cfg._pad_token_tensor)
    min_new = max(0, (cfg.min_length or 0) - P, cfg.min_new_tokens or 0) if eos else 0
    sample = bool(cfg.do_sample)
    return GenerateCall(ids, cfg.max_length - P, min_new, sample, float(cfg.temperature) if sample else 1.0,
                        (cfg.top_k or None) if sample else None, float(cfg.top_p) if sample else 1.0, eos, pad)


@functools.cache
def _known_fields(cls) -> frozenset[str]:
    return frozenset(vars(cls()))


def _neutral(v, values) -> bool:
    """``v`` is one of ``values`` (a value equal to an unset field or the global default: no effect)."""
    for n in values:
        try:
            if v is n or (n is not None and not isinstance(v, torch.Tensor) and bool(v == n)):
                return True
        except (TypeError, ValueError, RuntimeError):
            continue
    return False


def _unsupported_config(cfg) -> str | None:
    """Why the merged generation config needs transformers' loop (None: it does not)."""
    if cfg.cache_implementation != "static":
        return f"cache_implementation={cfg.cache_implementation!r} (the compiled path serves 'static')"
    mode = cfg.get_generation_mode()
    if mode not in ("greedy_search", "sample"):
        return f"generation mode {mode}"
    if cfg.use_cache is False:
        return "use_cache=False"
    if (cfg.num_return_sequences or 1) != 1:
        return f"num_return_sequences={cfg.num_return_sequences}"
    for name in _OUTPUTS:
        if getattr(cfg, name, None):
            return f"{name}=True"
    known = _known_fields(type(cfg))
    defaults = cfg._get_default_generation_params()
    for k, v in vars(cfg).items():
        if k.startswith("_") or k in _HANDLED or k in _INERT or k not in known:  # unknown: a custom entry, unused
            continue
        if (k in _SAMPLING_ONLY and not cfg.do_sample) or _neutral(v, (None, False, defaults.get(k), _NEUTRAL.get(k))):
            continue
        return f"{k}={v!r}"
    if cfg.do_sample:
        if cfg.temperature is None or not cfg.temperature > 0:
            return f"temperature={cfg.temperature!r}"
        if cfg.top_k is not None and (isinstance(cfg.top_k, bool) or not isinstance(cfg.top_k, int) or cfg.top_k < 0):
            return f"top_k={cfg.top_k!r}"
        if cfg.top_p is not None and not 0.0 < cfg.top_p <= 1.0:
            return f"top_p={cfg.top_p!r}"
    return None
