"""The one-pass KIVI emulation equals a token-by-token decode through the real cache."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from openautoglm.kv import KVCacheConfig
from openautoglm.kv.emulate import decode_perplexity, layer_bits_of
from openautoglm.kv.metrics import cached_perplexity
from openautoglm.prune.heads import remove_heads


def test_emulation_equals_token_by_token_decode():
    model = make_tiny_llama(0)
    remove_heads(model, {2: [5]})  # an uneven GQA layout (indexed K/V) on the way
    ids = torch.randint(2, 8192, (64,), generator=torch.Generator().manual_seed(0))
    kv = KVCacheConfig(bits=(4, None, 2, 2), group_size=8, residual_length=16)
    real = cached_perplexity(model, kv=kv, token_ids=ids, seq_len=64, chunk=1, progress=False).nll
    emulated = decode_perplexity(model, kv, token_ids=ids, seq_len=64).nll
    plain = decode_perplexity(model, None, token_ids=ids, seq_len=64).nll
    assert abs(real - emulated) < 1e-5 and abs(real - plain) > 10 * abs(real - emulated)


@pytest.mark.parametrize("kv", [KVCacheConfig(bits=4, share=True), KVCacheConfig(bits=4, share_layers=((0, 1),))])
def test_emulation_refuses_sharing(kv):
    with pytest.raises(ValueError, match="cross-layer sharing"):
        layer_bits_of(kv, 4)
