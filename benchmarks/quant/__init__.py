"""Weight quantization: decode/prefill speed (ours, bf16, torchao), kernel tuning and checks, quality."""
