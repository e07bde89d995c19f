"""Weight quantization: w8a8 (int8 / fp8), w8 and w4 weight-only, static int8; reloadable checkpoints.

``math`` (pure tensor functions) -> ``linear`` (quantized modules) -> ``kernels`` (device dispatch,
Triton) -> ``api`` (module surgery, the ``"quantize"`` rebuilder registered with ``hub``) -> ``onload`` /
``pretrained`` (quantize-on-load and streaming checkpoint-to-checkpoint quantization).
"""

from .api import DynamicQuantizer, QuantResult, is_quantized, quantize, quantized_layers, rebuild  # noqa: F401  (registers rebuilder)
from .config import SCHEMES, QuantConfig
from .linear import LINEAR_CLASSES, QuantLinear
from .math import dequantize, error_bound, pack_int4, quantize_per_token, unpack_int4
from .math import quantize as quantize_tensor
from .onload import QuantizeOnLoad
from .pretrained import quantize_pretrained
from .static import StaticQuantizer

__all__ = ["DynamicQuantizer", "StaticQuantizer", "QuantConfig", "QuantResult", "quantize", "quantize_pretrained", "QuantizeOnLoad", "is_quantized", "quantized_layers",
           "SCHEMES", "LINEAR_CLASSES", "QuantLinear", "quantize_tensor", "dequantize", "error_bound",
           "pack_int4", "unpack_int4", "quantize_per_token"]
