"""Mixture-of-experts models: weight bytes, decode / prefill speed and quality of quantized experts, estimate vs
peak."""
