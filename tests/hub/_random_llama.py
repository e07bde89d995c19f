"""Write a random-weight bf16 Llama checkpoint fast: one tensor at a time, shard by shard (never the model)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int, kv_heads: int, head_dim: int, tied: bool):
    """``(name, shape)`` of every tensor of a LlamaForCausalLM checkpoint, in layer order."""
    kv = kv_heads * head_dim
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter))]
    out.append(("model.norm.weight", (hidden,)))
    if not tied:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def write_random_llama(folder: Path, *, hidden=1024, inter=2816, layers=8, vocab=8192, heads=8, kv_heads=2,
                       shard_bytes=64 * 2**20, tied=False, seed=0, device="cpu") -> int:
    """A config.json + sharded bf16 safetensors (index included) of a random Llama; returns the weight bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=tied,
                max_position_embeddings=2048, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                dtype="bfloat16").save_pretrained(folder)
    g = torch.Generator(device).manual_seed(seed)
    groups: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in llama_shapes(hidden, inter, layers, vocab, kv_heads, head_dim, tied):
        nb = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nb > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nb
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            t = torch.empty(shape, device=device, dtype=torch.bfloat16).uniform_(-0.04, 0.04, generator=g)
            tensors[name] = (t + 1 if name.endswith("norm.weight") else t).cpu()
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total
