"""The fast decode helper: static KV cache, compiled layers, the whole decode step in one CUDA graph.

gpt-fast's recipe on a Hugging Face model, for the full-precision and the quantized model alike (so speed
ratios compare kernels, not harnesses)::

    from openautoglm.generation.generator import Generator
    gen = Generator(model)                       # Llama / Mistral / Qwen2 / Qwen3 and their MoE relatives
    out = gen.generate(input_ids, max_new_tokens=256)
    out.tokens, out.tokens_per_s, out.compile_s

How: the prompt is prefilled into per-layer K/V tensors of fixed length; one decoder layer's step
(:func:`_layer_step`: norms, projections, rotary, cache write, SDPA, MLP; the quantized q/k/v and gate/up
projections each run as one kernel launch at batch 1 and as one dequantize + GEMM at prefill,
``quant.kernels.fused_linears``) is compiled once with
``torch.compile(fullgraph=True)`` and reused by every layer (identical layers share one graph: regional
compilation, seconds instead of minutes for a 7B model); the step (embedding -> layers -> head ->
next token) is captured in a CUDA graph and replayed per token. The model's own modules run inside
(quantized Linears call their custom ops), so nothing is copied or re-packed. Compiled kernels land in
inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, or ``cache_dir=``), so a second process starts
faster; ``GenerateResult.compile_s`` reports the first call's compile and capture time.
Decode attention over the full-precision cache reads keys ``0..pos`` only (:mod:`openautoglm.kv.kernels.dense_decode`,
one Triton launch on CUDA; ``OPENAUTOGLM_DENSE_DECODE=0`` turns it off); prefill keeps SDPA.
On the CPU (or ``compile=False``) the same step runs eagerly: identical tokens, no speed-up.
With ``kv=KVCacheConfig(bits=4, ...)`` the layers keep a quantized KV cache instead and decode attends to it
with the fused kernel (:mod:`openautoglm.generation.kv_decode`). ``model.generate(..., cache_implementation="static")``
reaches this helper through :func:`enable_fast_generate` (:mod:`openautoglm.generation.routing`).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _hf
from .._util import flags
from ..kv.kernels import dense_decode
from . import block
from . import kv_decode as fast_decode
from .kv_decode import KVStores

log = logging.getLogger(__name__)
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "olmoe", "qwen2_moe")
# families the compiled step does not run (model.generate routing falls back to transformers, logging this)
UNSUPPORTED_WHY = {"deepseek_v3": "multi-head latent attention (MLA) is not in the compiled step",
                   "gpt_oss": "attention sinks and alternating sliding-window layers are not in the compiled step"}


@dataclass
class GenerateResult:
    """``tokens (batch, prompt + new)``; seconds of prefill, decode and first-call compilation."""

    tokens: torch.Tensor
    new_tokens: int
    prefill_s: float
    decode_s: float
    compile_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens of the whole batch made by decode steps per second (the first new token
        comes from the prefill and is not counted)."""
        return self.tokens.shape[0] * (self.new_tokens - 1) / max(self.decode_s, 1e-9)


def _layer_step(layer: nn.Module, h, cos, sin, k_cache, v_cache, pos, mask, rope, kernel: bool = False):
    """One Llama-family decoder layer on ``h (B, T, hidden)``, K/V written at ``pos (T,)`` of the caches;
    ``kernel`` (one token): attention by the dense decode kernel (reads keys 0..pos only; it falls back to SDPA
    where unsupported), else masked SDPA over the whole cache."""
    attn = layer.self_attn
    q, k, v = block.qkv(layer, h, cos, sin, rope)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    if kernel and q.shape[2] == 1:
        o = dense_decode.decode_attention(q, k_cache, v_cache, pos, attn.scaling)
    else:
        o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=attn.scaling,
                                           enable_gqa=attn.num_key_value_groups > 1)
    return block.finish(layer, h, o.transpose(1, 2))


def _layer_decode(*args):  # separate code objects: each decode variant and prefill keep their own compile caches
    return _layer_step(*args)


def _layer_decode_kernel(*args):
    return _layer_step(*args, kernel=True)


def _layer_prefill(*args):
    return _layer_step(*args)


def _head(norm: nn.Module, lm_head: nn.Module, h):
    return lm_head(norm(h[:, -1:])).float()[:, -1]


def _next_token(logits, temperature: float, top_k: int | None, top_p: float, do_sample: bool):
    """Greedy argmax, or sampling (temperature, top-k, top-p) without a host sync: argmax of p / Exp(1) noise."""
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = torch.where(logits < kth, torch.full_like(logits, -float("inf")), logits)
    if top_p < 1.0:  # keep the smallest prefix of the sorted distribution whose mass reaches top_p
        srt, idx = torch.sort(logits, descending=True)
        p = torch.softmax(srt, -1)
        srt = srt.masked_fill(p.cumsum(-1) - p > top_p, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(-1, idx, srt)
    probs = torch.softmax(logits, -1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)


def _ban_eos(logits, ban, index, min_new):
    """EOS logits ``ban (vocab,)`` to -inf while the token being made, ``index (1,)``, is before ``min_new (1,)``:
    transformers' ``MinNewTokensLengthLogitsProcessor`` on device tensors (no host sync, CUDA-graph safe)."""
    return logits.masked_fill(ban & (index < min_new), -float("inf"))


@contextlib.contextmanager
def _inductor_cache(folder):
    """``TORCHINDUCTOR_CACHE_DIR=folder`` for the block (inductor reads it when it compiles), then as before."""
    if not folder:
        yield
        return
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def _eos_ids(eos_token_id) -> list[int] | None:
    """``eos_token_id`` (an int, a sequence of ints or a tensor of them) as a list; ``None`` stays ``None``."""
    if eos_token_id is None:
        return None
    raw = eos_token_id.tolist() if isinstance(eos_token_id, torch.Tensor) else eos_token_id
    raw = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    try:
        if not raw or any(isinstance(i, bool) for i in raw):
            raise TypeError
        return [operator.index(i) for i in raw]
    except TypeError:
        raise ValueError(f"eos_token_id must be an int or a non-empty list of ints, got {eos_token_id!r}") from None


class Generator:
    """Decode helper bound to one model (see the module docstring).

    Parameters
    ----------
    model : a Llama / Mistral (no sliding window) / Qwen2 / Qwen3 causal LM, or a Mixtral / Qwen3-MoE / OLMoE / Qwen2-MoE
        one (their MoE blocks run in place of the MLP), full precision or quantized.
    compile : compile the layer step with ``torch.compile`` (default: on CUDA).
    cuda_graph : capture the decode step in a CUDA graph (default: on CUDA).
    cache_dir : inductor's on-disk cache folder (``TORCHINDUCTOR_CACHE_DIR`` while this Generator's calls
        compile, restored after).
    kv : a quantized KV cache (:class:`openautoglm.kv.KVCacheConfig` with ``bits``, optionally
        ``share_layers``) instead of full-precision K/V buffers.
    """

    def __init__(self, model: nn.Module, *, compile: bool | None = None, cuda_graph: bool | None = None,
                 cache_dir: str | None = None, kv=None) -> None:
        cfg = _hf.text_config(model.config)
        if cfg.model_type not in SUPPORTED:
            why = f" ({UNSUPPORTED_WHY[cfg.model_type]})" if cfg.model_type in UNSUPPORTED_WHY else ""
            raise ValueError(f"Generator supports {', '.join(SUPPORTED)} models, got model_type {cfg.model_type!r}"
                             f"{why}; use model.generate(..., cache_implementation='static') instead")
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
            raise ValueError(f"Generator does not implement sliding-window attention (sliding_window={cfg.sliding_window})")
        self.model, self.cfg = model, cfg
        self.layers = _hf.decoder_layers(model)
        if any(getattr(layer.self_attn, "_openautoglm_kv_index", None) is not None for layer in self.layers):
            raise ValueError("Generator does not run attention with uneven KV groups (pruned heads); use model.generate")
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.lm_head = model.get_output_embeddings()
        attn = self.layers[0].self_attn
        self.rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")
        p = next(model.parameters())
        self.device = p.device
        self.dtype = self.base.embed_tokens.weight.dtype
        cuda = self.device.type == "cuda"
        self.compile = cuda if compile is None else compile
        self.cuda_graph = cuda if cuda_graph is None else (cuda_graph and cuda)
        self.cache_dir = cache_dir
        # decode attention over the full-precision cache: the Triton kernel on CUDA (or in Triton's interpreter)
        # unless OPENAUTOGLM_DENSE_DECODE is off; decided here, so the compiled step holds a constant
        self.dense_kernel = flags.enabled(flags.DENSE_DECODE) and (cuda or flags.triton_interpret())
        self.kv = kv
        if kv is not None:
            fast_decode.KVStores.check(kv)
            self._dec_kv = (torch.compile(fast_decode.layer_decode, fullgraph=True, dynamic=False) if self.compile
                            else fast_decode.layer_decode)
        decode = _layer_decode_kernel if self.dense_kernel else _layer_decode
        if self.compile:
            self._dec = torch.compile(decode, fullgraph=True, dynamic=False)
            self._pre = torch.compile(_layer_prefill, fullgraph=True, dynamic=True)
            self._hd = torch.compile(_head, fullgraph=True, dynamic=False)
        else:
            self._dec, self._pre, self._hd = decode, _layer_prefill, _head
        self._state: dict = {}

    # ------------------------------------------------------------------ state per (batch, cache length)
    def _buffers(self, batch: int, length: int) -> dict:
        key = (batch, length)
        if key not in self._state:
            self._state.clear()  # one shape at a time: the caches are the big part
            n_kv, hd = _hf.num_kv_heads(self.cfg), _hf.head_dim(self.cfg)
            kv = [] if self.kv is not None else [torch.zeros(batch, n_kv, length, hd, device=self.device, dtype=self.dtype)
                                                 for _ in range(2 * len(self.layers))]
            self._state[key] = dict(k=kv[0::2], v=kv[1::2], ar=torch.arange(length, device=self.device),
                                    tok=torch.zeros(batch, 1, dtype=torch.long, device=self.device),
                                    pos=torch.zeros(1, dtype=torch.long, device=self.device), graph=None,
                                    out=torch.zeros(batch, length, dtype=torch.long, device=self.device),
                                    start=torch.zeros(1, dtype=torch.long, device=self.device),
                                    suppress=False)  # min_new_tokens on (set per call by _set_eos)
            if self.kv is not None:
                self._state[key]["kv"] = KVStores(self.kv, self.cfg, batch, length, self.device, self.dtype)
        return self._state[key]

    def _forward(self, st: dict, ids: torch.Tensor, pos: torch.Tensor, fn) -> torch.Tensor:
        h = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(h, pos.view(1, -1).expand(ids.shape[0], -1))
        if "kv" in st:  # quantized cache: eager exact prefill, fused decode
            exact: dict = {}
            for i, layer in enumerate(self.layers):
                if fn is self._pre:
                    h = st["kv"].prefill_layer(i, layer, h, cos, sin, self.rope, exact)
                else:
                    h = self._dec_kv(layer, h, cos, sin, self.rope, *st["kv"].args(i))
            return self._hd(self.base.norm, self.lm_head, h)
        mask = (st["ar"].view(1, -1) <= pos.view(-1, 1)).view(1, 1, pos.numel(), -1)
        for i, layer in enumerate(self.layers):
            h = fn(layer, h, cos, sin, st["k"][i], st["v"][i], pos, mask, self.rope)
        return self._hd(self.base.norm, self.lm_head, h)

    def _step(self, st: dict, sample: tuple) -> None:
        logits = self._forward(st, st["tok"], st["pos"], self._dec)
        if st["suppress"]:  # min_new_tokens: the new token's index is pos - start
            logits = _ban_eos(logits, st["ban"], st["pos"] - st["start"], st["min_new"])
        st["tok"].copy_(_next_token(logits, *sample))
        st["out"].index_copy_(1, st["pos"] - st["start"], st["tok"])
        st["pos"].add_(1)

    def _capture(self, st: dict, sample: tuple) -> None:
        """Compile (warm-up steps on a side stream) and capture the decode step; restores tok/pos."""
        tok0, pos0 = st["tok"].clone(), st["pos"].clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step(st, sample)
        torch.cuda.current_stream().wait_stream(s)
        st["tok"].copy_(tok0)
        st["pos"].copy_(pos0)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._step(st, sample)
        st["tok"].copy_(tok0)
        st["pos"].copy_(pos0)
        st["graph"], st["graph_key"] = g, (sample, st["suppress"])

    @staticmethod
    def _set_eos(st: dict, eos: list[int] | None, min_new_tokens: int, suppress: bool, vocab: int) -> None:
        """Fill the step's EOS inputs in place (the captured graph reads these buffers)."""
        if "ban" not in st:
            st["ban"] = torch.zeros(vocab, dtype=torch.bool, device=st["pos"].device)
            st["min_new"] = torch.zeros(1, dtype=torch.long, device=st["pos"].device)
        st["suppress"] = suppress
        st["eos"] = None if eos is None else torch.tensor(eos, dtype=torch.long, device=st["pos"].device)
        st["ban"].zero_()
        if eos is not None:
            st["ban"][[i for i in eos if 0 <= i < vocab]] = True  # out-of-vocabulary ids cannot be produced anyway
        st["min_new"].fill_(min_new_tokens)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, min_new_tokens: int = 0,
                 cache_len: int | None = None, check_every: int = 32) -> GenerateResult:
        """Continue ``input_ids (batch, prompt)`` by ``max_new_tokens`` tokens (all rows the same length).

        ``cache_len`` (default: prompt + new tokens rounded up to 256) sizes the static cache; calls with the
        same batch and ``cache_len`` reuse the compiled step and its CUDA graph. With ``eos_token_id`` (one id
        or several) the loop stops once every row has produced one (checked every ``check_every`` tokens; a
        row's later tokens are set to the first of ``eos_token_id``). ``min_new_tokens``: no EOS among a row's
        first that many new tokens (their logits are -inf inside the captured step, as transformers'
        ``min_new_tokens`` does).
        """
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, prompt) with a non-empty prompt, got {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        B, P = input_ids.shape
        need = P + max_new_tokens
        length = cache_len or -(-need // 256) * 256
        if length < need:
            raise ValueError(f"cache_len={cache_len} is shorter than prompt + new tokens = {need}")
        limit = getattr(self.cfg, "max_position_embeddings", None)
        if limit and need > limit:
            raise ValueError(f"prompt + new tokens = {need} exceeds the model's max_position_embeddings {limit}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        eos = _eos_ids(eos_token_id)
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
        sample = (float(temperature), top_k, float(top_p), bool(do_sample))
        suppress = eos is not None and min_new_tokens > 0
        with _inductor_cache(self.cache_dir):
            return self._generate(input_ids, max_new_tokens, sample, eos, min_new_tokens, suppress, length, check_every)

    def _generate(self, input_ids, max_new_tokens, sample, eos, min_new_tokens, suppress, length, check_every):
        B, P = input_ids.shape
        t_start = time.perf_counter()
        st = self._buffers(B, length)
        fresh = st["graph"] is None or st["graph_key"] != (sample, suppress)
        ids = input_ids.to(self.device)
        if "kv" in st:
            st["kv"].reset()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        logits = self._forward(st, ids, torch.arange(P, device=self.device), self._pre)
        self._set_eos(st, eos, min_new_tokens, suppress, logits.shape[-1])
        if suppress:
            logits = logits.masked_fill(st["ban"], -float("inf"))  # the first new token (index 0 < min_new_tokens)
        st["tok"].copy_(_next_token(logits, *sample))
        st["start"].fill_(P - 1)
        st["out"][:, 0:1] = st["tok"]
        st["pos"].fill_(P)
        sync()
        prefill_s = time.perf_counter() - t0
        compile_s = 0.0
        if self.cuda_graph and fresh:
            self._capture(st, sample)
            sync()
            compile_s = time.perf_counter() - t_start - prefill_s
        elif self.compile and fresh:
            st["graph"], st["graph_key"] = None, (sample, suppress)
        t1 = time.perf_counter()
        done = 1
        while done < max_new_tokens:
            n = min(check_every, max_new_tokens - done)
            for _ in range(n):
                st["graph"].replay() if self.cuda_graph else self._step(st, sample)
            done += n
            if eos is not None and bool(torch.isin(st["out"][:, :done], st["eos"]).any(1).all()):
                break
        sync()
        decode_s = time.perf_counter() - t1
        new = st["out"][:, :done].clone()
        if eos is not None:
            hit = torch.isin(new, st["eos"]).int()
            new[hit.cumsum(1) - hit > 0] = eos[0]
        log.debug("generate: batch %d, %d new tokens, prefill %.3fs, decode %.3fs", B, done, prefill_s, decode_s)
        return GenerateResult(torch.cat([ids, new], 1), done, prefill_s, decode_s, compile_s)
