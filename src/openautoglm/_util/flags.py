"""Every environment switch openautoglm reads, parsed by one rule, at call time.

============================== ========= ==================================================================
variable                       default   effect
============================== ========= ==================================================================
``OPENAUTOGLM_FAST_GENERATE``  on        ``model.generate(..., cache_implementation="static")`` on models openautoglm
                                         loads or quantizes runs the compiled CUDA-graph decode when it returns
                                         exactly what transformers returns (read when the model is loaded or
                                         quantized; :func:`openautoglm.enable_fast_generate` per model)
``OPENAUTOGLM_DENSE_DECODE``   on        the compiled decode attends over its full-precision cache with the Triton
                                         decode-attention kernel; off: masked SDPA over the whole cache (read when
                                         a :class:`~openautoglm.generation.Generator` is built)
``OPENAUTOGLM_KV_TRITON``      on        the quantized KV caches append and attend with their Triton kernels on
                                         CUDA; off: the torch reference path (read at each call)
``OPENAUTOGLM_CACHE``          ``~/.cache/openautoglm``  folder of the budget mode's sensitivity cache
``TRITON_INTERPRET``           off       Triton's own switch: kernels run in Triton's CPU interpreter (the tests'
                                         way to check kernels without a GPU)
============================== ========= ==================================================================

Switches accept ``1/true/yes/on`` and ``0/false/no/off`` (any case, surrounding blanks ignored); an empty value
means the default; any other value logs a warning once and keeps the default. Nothing here writes the
process environment.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("openautoglm")

FAST_GENERATE = "OPENAUTOGLM_FAST_GENERATE"
DENSE_DECODE = "OPENAUTOGLM_DENSE_DECODE"
KV_TRITON = "OPENAUTOGLM_KV_TRITON"
CACHE = "OPENAUTOGLM_CACHE"
TRITON_INTERPRET = "TRITON_INTERPRET"

SWITCHES = {FAST_GENERATE: True, DENSE_DECODE: True, KV_TRITON: True, TRITON_INTERPRET: False}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_warned: set[tuple[str, str]] = set()


def enabled(name: str) -> bool:
    """The on/off switch ``name`` (a key of :data:`SWITCHES`) as the environment sets it now."""
    if name not in SWITCHES:
        raise KeyError(f"unknown switch {name!r}; known: {', '.join(SWITCHES)}")
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    if raw and (name, raw) not in _warned:
        _warned.add((name, raw))
        log.warning("%s=%r is not one of %s; using the default (%s)", name, raw, "/".join(_TRUE + _FALSE),
                    "on" if SWITCHES[name] else "off")
    return SWITCHES[name]


def cache_dir() -> Path:
    """Folder of openautoglm's on-disk caches: ``OPENAUTOGLM_CACHE``, else ``~/.cache/openautoglm``."""
    raw = os.environ.get(CACHE, "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "openautoglm"


def triton_interpret() -> bool:
    """Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET``): they then take CPU tensors."""
    return enabled(TRITON_INTERPRET)
