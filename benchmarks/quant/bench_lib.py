"""Pieces of :mod:`benchmarks.quant.bench` shared with other benchmarks: the random Llama shapes, the static-cache
CUDA-graph decode loop (also :mod:`benchmarks.parallel.multi_gpu`'s), plot and table."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from benchmarks._harness import capture
from openautoglm import _hf

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "smoke": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024),
}


def build(shape: str, dev, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            m = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return m.eval()


class Decoder:
    """Static-cache greedy decode with the whole step captured in one CUDA graph (eager step on CPU)."""

    def __init__(self, model, batch: int, prompt: torch.Tensor, new_tokens: int):
        from transformers import StaticCache

        self.model, self.batch, self.new = model, batch, new_tokens
        dev = prompt.device
        plen = prompt.shape[1]
        self.cache = StaticCache(config=model.config, max_cache_len=plen + new_tokens + 8)
        with torch.no_grad():
            out = _hf.forward_with_cache(model, prompt, self.cache, cache_position=torch.arange(plen, device=dev))
        self.first = out.logits[:, -1].float()
        self.tok = out.logits[:, -1:].argmax(-1)
        self.tok0 = self.tok.clone()
        self.pos = torch.tensor([plen], device=dev)
        self.plen = plen
        self.graph, self.graph_error = None, None
        if dev.type == "cuda":
            self.graph, self.graph_error = capture(self.step, warmup=3, reset=self.reset)  # else the eager loop
        self.reset()

    @torch.no_grad()
    def step(self):
        out = _hf.forward_with_cache(self.model, self.tok, self.cache, cache_position=self.pos,
                                     position_ids=self.pos.view(1, 1).expand(self.batch, 1))
        self.tok.copy_(out.logits[:, -1:].argmax(-1))
        self.pos.add_(1)

    def reset(self):
        self.tok.copy_(self.tok0)
        self.pos.fill_(self.plen)
        # transformers >= 5.x StaticLayer writes at its own device counter (cumulative_length), not at
        # cache_position: rewind it too, in place (the CUDA graph holds its address).
        for layer in getattr(self.cache, "layers", []):
            c = getattr(layer, "cumulative_length", None)
            if isinstance(c, torch.Tensor):
                c.fill_(self.plen)

    def check(self, n: int = 8) -> bool:
        """The captured graph produces the same greedy tokens as the eager step (first ``n`` steps)."""
        if self.graph is None:
            return True
        self.reset()
        eager = []
        for _ in range(n):
            self.step()
            eager.append(self.tok.clone())
        self.reset()
        graph = []
        for _ in range(n):
            self.graph.replay()
            graph.append(self.tok.clone())
        return all(torch.equal(a, b) for a, b in zip(eager, graph))

    def run(self) -> torch.Tensor:
        self.reset()
        for _ in range(self.new):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
        return self.tok


def plot(res, path: Path, decode_key: str = "tokens_per_s", prefill_key: str = "prefill_speedup_vs_bf16",
         what: str = "tok/s") -> None:
    """Bars per model: decode at batch 1 and 8 (``decode_b*[decode_key]``) and prefill (``prefill_key``), one bar a
    variant, ours blue and torchao's orange (PNG; nothing without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = [m for m, rows in res["models"].items() if any("weight_bytes" in r for r in rows)]
    if not models:
        return
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 3.6 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        rows = [r for r in res["models"][m] if "weight_bytes" in r]
        names = [r["variant"] for r in rows]
        colors = ["C1" if n.startswith("ao-") else "C0" for n in names]
        for j, key in enumerate(("decode_b1", "decode_b8")):
            axes[i][j].bar(names, [r.get(key, {}).get(decode_key, 0) for r in rows], color=colors)
            axes[i][j].set_title(f"{m}: decode {what}, batch {key[-1]}")
        axes[i][2].bar(names, [r.get(prefill_key) or 0 for r in rows], color=colors)
        axes[i][2].axhline(1.0, color="k", lw=0.8)
        axes[i][2].set_title(f"{m}: prefill {res['prefill_tokens']} speed, x bf16")
        for ax in axes[i]:
            ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{res['device']}: ours (blue) vs torchao {res['torchao']} (orange), one run, same harness")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarize(res):
    print(f"\n{res['device']}  torch {res['torch']}  torchao {res['torchao']}  copy {res['copy_GBps']:.0f} GB/s")
    hdr = f"{'model':6} {'variant':10} {'scheme':9} {'GB':>6} {'x':>5} {'b1 tok/s':>9} {'x':>5} {'GB/s':>6} {'b8 tok/s':>9} {'x':>5} {'pf ms':>7} {'x':>5} {'cos':>6}"
    print(hdr)
    for shape, rows in res["models"].items():
        for r in rows:
            if "weight_bytes" not in r:
                print(f"{shape:6} {r['variant']:10} {r.get('skipped') or r.get('error', '')[:80]}")
                continue
            d1, d8 = r.get("decode_b1", {}), r.get("decode_b8", {})
            f = lambda v, w=6, p=2: f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa: E731
            print(f"{shape:6} {r['variant']:10} {r['scheme']:9} {f(r['weight_bytes'] / 1e9)} {f(r.get('weight_ratio_vs_bf16'), 5)} "
                  f"{f(d1.get('tokens_per_s'), 9, 1)} {f(d1.get('speedup_vs_bf16'), 5)} {f(d1.get('achieved_GBps'), 6, 0)} "
                  f"{f(d8.get('tokens_per_s'), 9, 1)} {f(d8.get('speedup_vs_bf16'), 5)} {f(r.get('prefill_ms'), 7, 1)} "
                  f"{f(r.get('prefill_speedup_vs_bf16'), 5)} {f(r.get('logits_cosine_vs_bf16'), 6, 4)}"
                  )
    for k, g in res.get("generate", {}).items():
        print(f"generate {k}: {g}")
