"""Calibrated and calibration-free weight quantizers as pure tensor math (one weight at a time).

Every function takes a float ``(out, in)`` weight (plus calibration statistics where the method needs them) and
returns a :class:`~.rtn.GroupQuant` -- codes, scales, zeros in the conventions of
:mod:`openautoglm.quant.math` -- whose :meth:`~.rtn.GroupQuant.padded` feeds the packers of
:mod:`openautoglm.quant.linear` and whose :meth:`~.rtn.GroupQuant.dequantize` gives the fake-quantized weight.
Module surgery (walking a model, folding scales into norms, the sequential calibration pass) lives elsewhere.

=========  =======================================  ==============================
method     needs                                    function
=========  =======================================  ==============================
rtn        nothing                                  :func:`rtn`
hqq        nothing                                  :func:`hqq_quantize`
gptq       ``H = 2 X^T X / n`` of the layer input   :func:`gptq_quantize`
awq        layer inputs ``X``                       :func:`awq_search_scales`, :func:`awq_quantize`
smooth     layer inputs ``X`` (W8A8)                :func:`smooth_search`, :func:`smooth_factors`
=========  =======================================  ==============================
"""

from .awq import apply_scales, awq_quantize, awq_search_clip, awq_search_scales
from .gptq import HessianAccumulator, gptq_quantize, layer_error
from .hqq import hqq_quantize
from .rtn import CALIB_BITS, GroupQuant, dividing_group_size, fake_quant, pad_columns, rtn
from .smooth import act_absmax, fake_w8a8, fold_into_norm, smooth_factors, smooth_search

__all__ = [
    "CALIB_BITS", "GroupQuant", "HessianAccumulator", "act_absmax", "apply_scales", "awq_quantize",
    "awq_search_clip", "awq_search_scales", "dividing_group_size", "fake_quant", "fake_w8a8", "fold_into_norm",
    "gptq_quantize", "hqq_quantize", "layer_error", "pad_columns", "rtn", "smooth_factors", "smooth_search",
]
