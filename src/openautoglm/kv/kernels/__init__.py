"""The KV cache's device paths: dispatch and custom ops (:mod:`.ops`, :mod:`.dense_decode`) and their Triton
sources (``triton_*``), each with a torch reference used on the CPU."""
