"""KV cache compression: KIVI-quantized cache (INT8/INT4/INT2) and cross-layer sharing (MiniCache).

Both are transformers ``Cache`` classes: pass one as ``model.generate(..., past_key_values=cache)`` or
to a forward loop. ``KVCacheConfig`` describes either (or both) and builds a fresh cache per use.
"""

from .config import KVCacheConfig
from .quantized import QuantizedKVCache
from .sharing import CrossLayerKVCache

__all__ = ["KVCacheConfig", "QuantizedKVCache", "CrossLayerKVCache"]
