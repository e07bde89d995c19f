"""Loading: streaming quantize-on-load of a checkpoint bigger than the host's memory."""
