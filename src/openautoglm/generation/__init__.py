"""Generation: the compiled CUDA-graph decode helper, ``model.generate`` routing, generation with compressed KV.

* :mod:`.generator` -- :class:`Generator`: static KV cache, one compiled decoder-layer step, the decode step
  replayed from a CUDA graph (gpt-fast's recipe on a Hugging Face model, full precision or quantized).
* :mod:`.routing` -- :func:`enable_fast_generate`: ``model.generate(..., cache_implementation="static")``
  served by the :class:`Generator` whenever it returns exactly what transformers returns.
* :mod:`.kv_decode` -- the quantized KV cache inside the :class:`Generator`.
* :mod:`.kv` -- :func:`generate_with`: transformers' ``generate`` with a compressed KV cache.
"""

from .generator import GenerateResult, Generator
from .routing import enable_fast_generate

__all__ = ["GenerateResult", "Generator", "enable_fast_generate"]
