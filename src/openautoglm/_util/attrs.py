"""The attributes openautoglm sets on objects it does not own (models, modules, configs), all in one place.

Every one starts with :data:`PREFIX`, so a user inspecting ``vars(model)`` sees at once what is ours.
"""

from __future__ import annotations

PREFIX = "_openautoglm_"

# on a model
SOURCE = PREFIX + "source"                  # folder it was loaded from (None when not loaded by us): tokenizer copy
OWNS_CONFIG = PREFIX + "owns_config"        # its config is its own copy, so transform records never leak
FAST_GENERATE_OFF = PREFIX + "fast_generate_off"  # the user turned model.generate routing off: defaults leave it

# on an attention module
ATTN_OVERRIDE = PREFIX + "attn_override"    # the attention function a compressed KV cache installed for a call
KV_BASE_ATTENTION = PREFIX + "kv_base_attention"  # the attention implementation before fused KV decode
KV_INDEX = PREFIX + "kv_index"              # buffer: the KV head each query head reads (uneven GQA after pruning)

# inside the config views of :mod:`openautoglm._hf` (wrappers we own, listed for completeness)
VIEW_BASE = PREFIX + "base"                 # the wrapped config
VIEW_OVERRIDES = PREFIX + "overrides"       # per-layer values read instead of the wrapped config's
VIEW_INDEXED = PREFIX + "indexed"           # the view's attention uses KV_INDEX
VIEW_INNER = PREFIX + "inner"               # the wrapped config of an owned-config view

ALL = (SOURCE, OWNS_CONFIG, FAST_GENERATE_OFF, ATTN_OVERRIDE, KV_BASE_ATTENTION, KV_INDEX, VIEW_BASE,
       VIEW_OVERRIDES, VIEW_INDEXED, VIEW_INNER)
