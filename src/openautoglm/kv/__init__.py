"""KV cache compression: KIVI-quantized cache (INT8/INT4/INT2), fused decode attention, cross-layer sharing.

Both kinds are transformers ``Cache`` classes: pass one as ``model.generate(..., past_key_values=cache)`` or
to a forward loop. ``KVCacheConfig`` describes either (or both) and builds a fresh cache per use;
``enable_fused_attention(model)`` makes decode read the quantized cache directly (Triton on CUDA);
``search_sharing`` picks the layers that can read an earlier layer's cache (calibrated, KVSharer-style).
"""

from .attention import disable_fused_attention, enable_fused_attention
from .config import KVCacheConfig
from .mixed import MixedKVCache
from .quantized import QuantizedKVCache
from .share_search import SharingPlan, search_sharing
from .sharing import CrossLayerKVCache

__all__ = ["KVCacheConfig", "MixedKVCache", "QuantizedKVCache", "CrossLayerKVCache", "enable_fused_attention",
           "disable_fused_attention", "search_sharing", "SharingPlan"]
