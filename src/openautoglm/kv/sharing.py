"""``CrossLayerKVCache``: MiniCache-style merging of adjacent layers' KV into one shared store.

Liu et al., 2024 ("MiniCache: KV Cache Compression in Depth Dimension for LLMs"): in the deeper
half of an LLM, adjacent layers' keys and values point in similar directions. For each pair of
layers ``(a, a + 1)`` from ``start_layer`` on, every new token's key (and separately its value) is
split into a direction and a norm per head; when the two layers' directions agree (cosine >=
``threshold``) only their SLERP interpolation is stored, shared by both layers, plus each layer's
norm; tokens whose directions disagree are *retained*: both layers keep their exact vectors. The
pair therefore holds about one layer's worth of KV instead of two. The shared directions can be
held by a KIVI-quantized store (``bits=``), so both compressions compose.

Decode tokens follow the same rule as prefill tokens. ``report()`` says which layers were paired,
how similar every pair of adjacent layers was at prefill and what fraction of tokens was shared.
"""

from __future__ import annotations

import logging

import torch

from .._util import checks as C
from .cache import CompressedKVCache, KVLayer, layer_count, validate_quant_args
from .stores import FullStore, QuantStore

log = logging.getLogger(__name__)

NORM_DTYPE = torch.float16


# ---- tensor math --------------------------------------------------------------------------------

def directions(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., d) -> unit directions (..., d) float32 and norms (..., 1) float32."""
    xf = x.float()
    n = xf.norm(dim=-1, keepdim=True)
    return xf / n.clamp_min(eps), n


def slerp(ua: torch.Tensor, ub: torch.Tensor, t: float = 0.5, eps: float = 1e-4) -> torch.Tensor:
    """Spherical interpolation of unit vectors ``(..., d)``; ``t=0`` gives ``ua``. Returns unit vectors."""
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    small = sin < eps
    wa = torch.where(small, torch.full_like(sin, 1 - t), torch.sin((1 - t) * theta) / sin.clamp_min(eps))
    wb = torch.where(small, torch.full_like(sin, t), torch.sin(t * theta) / sin.clamp_min(eps))
    out = wa * ua + wb * ub
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def merge_pair(xa: torch.Tensor, xb: torch.Tensor, threshold: float, t: float = 0.5):
    """Merge two layers' states ``(batch, heads, n, d)``.

    Returns the shared directions (b, h, n, d) float32 (``ua`` where the layers disagree), norms
    of a and b (b, h, n, 1) float32, and ``merged`` (b, h, n) bool: cosine of directions >= threshold.
    """
    ua, na = directions(xa)
    ub, nb = directions(xb)
    cos = (ua * ub).sum(-1)
    merged = cos >= threshold
    shared = torch.where(merged.unsqueeze(-1), slerp(ua, ub, t), ua)
    return shared, na, nb, merged


def _restore(dirs: torch.Tensor, norms: torch.Tensor, idx: torch.Tensor, exact) -> torch.Tensor:
    """dirs (b, h, n, d) * norms (b, h, n, 1), with rows ``idx`` (m, 3: batch, head, token) set to ``exact`` (m, d)."""
    out = dirs * norms.to(dirs.dtype)
    if exact is not None and idx.numel():
        i = idx.long()
        out[i[:, 0], i[:, 1], i[:, 2]] = exact.to(out.dtype)
    return out


# ---- the shared pair ----------------------------------------------------------------------------

class _Pair:
    """State shared by layers ``a`` and ``a + 1``: shared directions, norms, retained tokens."""

    def __init__(self, layers: tuple[int, int], threshold: float, t: float, make_store, min_shared: float = 0.0) -> None:
        self.layers, self.threshold, self.t, self._make = layers, threshold, t, make_store
        self.min_shared = min_shared
        self.split: tuple | None = None  # (store a, store b) once the pair is found too dissimilar to share
        self.dirs = make_store()  # holds (key directions, value directions)
        self.norms = {}  # "ka", "kb", "va", "vb" -> (b, h, n, 1) float16
        self.ret_idx = {}  # "k", "v" -> (m, 3) int32 (batch, head, token)
        # "kb", "vb" -> (m, d): layer b's exact vectors of the retained tokens. Layer a needs none: where
        # the layers disagree the stored direction is layer a's own, so direction x norm restores it.
        self.ret = {}
        self.pending = None  # layer a's new (k, v), until layer b arrives
        self.merged_count = {"k": 0, "v": 0}
        self.total_count = 0
        self.batch = None

    def reset(self) -> None:
        self.__init__(self.layers, self.threshold, self.t, self._make, self.min_shared)

    @property
    def length(self) -> int:
        return self.split[1].length if self.split else self.dirs.length

    def _read(self, side: str, dk: torch.Tensor, dv: torch.Tensor, k_new, v_new):
        if not self.norms:
            return k_new, v_new
        k = _restore(dk, self.norms["k" + side], self.ret_idx["k"], self.ret.get("k" + side))
        v = _restore(dv, self.norms["v" + side], self.ret_idx["v"], self.ret.get("v" + side))
        return torch.cat([k, k_new.to(k.dtype)], dim=-2), torch.cat([v, v_new.to(v.dtype)], dim=-2)

    def update_a(self, k: torch.Tensor, v: torch.Tensor):
        if self.split:
            return self.split[0].update(k, v)
        if self.pending is not None:
            raise RuntimeError(f"layer {self.layers[1]} was not updated after layer {self.layers[0]}")
        if self.batch is not None and k.shape[0] != self.batch:
            raise ValueError(
                f"this KV cache holds batch size {self.batch} but got batch size {k.shape[0]}; a cache serves "
                "one batch: call cache.reset() or create a new cache for a different batch"
            )
        dk, dv = self.dirs.read() if self.dirs.length else (None, None)
        self.pending = (k, v)
        return self._read("a", dk, dv, k, v)

    def update_b(self, k: torch.Tensor, v: torch.Tensor):
        if self.split:
            return self.split[1].update(k, v)
        if self.pending is None:
            raise RuntimeError(f"layer {self.layers[0]} must be updated before layer {self.layers[1]}")
        ka, va = self.pending
        self.pending = None
        if ka.shape != k.shape:
            raise ValueError(f"paired layers {self.layers} have different KV shapes {tuple(ka.shape)} / {tuple(k.shape)}")
        n_past = self.dirs.length
        dk, dv = self.dirs.read() if n_past else (None, None)
        out = self._read("b", dk, dv, k, v)
        sk, nka, nkb, mk = merge_pair(ka, k, self.threshold, self.t)
        sv, nva, nvb, mv = merge_pair(va, v, self.threshold, self.t)
        if n_past == 0 and self.min_shared > 0:
            shared = 0.5 * float(mk.float().mean() + mv.float().mean())
            if shared < self.min_shared:  # too dissimilar: sharing would cost more than it saves
                log.info("layers %s share %.1f%% of tokens (< %.0f%%): kept separate", self.layers, 100 * shared,
                         100 * self.min_shared)
                self.split = (self._make(), self._make())
                self.split[0].append(ka, va)
                self.split[1].append(k, v)
                self.total_count += mk.numel()
                return out
        self.dirs.append(sk.to(k.dtype), sv.to(v.dtype))
        self.batch = k.shape[0]
        new = {"ka": nka, "kb": nkb, "va": nva, "vb": nvb}
        for name, n in new.items():
            n = n.to(NORM_DTYPE)
            self.norms[name] = n if name not in self.norms else torch.cat([self.norms[name], n], dim=-2)
        for kind, mask, xa, xb in (("k", mk, ka, k), ("v", mv, va, v)):
            keep = (~mask).nonzero()  # (m, 3)
            rb = xb[keep[:, 0], keep[:, 1], keep[:, 2]]
            keep[:, 2] += n_past
            keep = keep.to(torch.int32)
            if kind in self.ret_idx:
                keep = torch.cat([self.ret_idx[kind], keep])
                rb = torch.cat([self.ret[kind + "b"], rb])
            self.ret_idx[kind], self.ret[kind + "b"] = keep, rb
            self.merged_count[kind] += int(mask.sum())
        self.total_count += mk.numel()
        return out

    def tensors(self):
        if self.split:
            for st in self.split:
                yield from st.tensors()
            return
        yield from self.dirs.tensors()
        yield from self.norms.values()
        yield from self.ret_idx.values()
        yield from self.ret.values()
        if self.pending is not None:
            yield from self.pending


class _PairSlot:
    """Layer ``a`` (side "a") or ``a + 1`` (side "b") of a :class:`_Pair`."""

    def __init__(self, pair: _Pair, side: str) -> None:
        self.pair, self.side = pair, side

    @property
    def length(self) -> int:
        if self.pair.split:
            return self.pair.split[0 if self.side == "a" else 1].length
        return self.pair.length + (self.pair.pending[0].shape[-2] if self.side == "a" and self.pair.pending else 0)

    @property
    def batch(self):
        return self.pair.batch

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def update(self, k, v):
        return self.pair.update_a(k, v) if self.side == "a" else self.pair.update_b(k, v)

    def reset(self) -> None:
        if self.side == "a":
            self.pair.reset()

    def tensors(self):
        return iter(()) if self.side == "b" else self.pair.tensors()

    def map_batch(self, fn) -> None:
        raise NotImplementedError("beam search / batch reordering is not supported by CrossLayerKVCache")


class CrossLayerKVCache(CompressedKVCache):
    """Cross-layer KV sharing (MiniCache), optionally with a KIVI-quantized shared store.

    Parameters
    ----------
    start_layer : first layer of the first merged pair (default: half the depth); pairs are
        ``(start_layer, start_layer + 1), (start_layer + 2, start_layer + 3), ...``.
    threshold : a token (per head) is shared when the cosine between the two layers' directions is
        at least this (in [-1, 1]); other tokens are retained exactly.
    t : SLERP interpolation weight of the later layer (0.5: the midpoint).
    min_shared : a pair whose prefill shares fewer than this fraction of (token, head) entries is kept
        as two separate layers (sharing few tokens costs more than it saves: norms and indices).
    config / num_layers : the model's config (validated) or its layer count; one is required.
    bits, group_size, residual_length : quantize every store (shared directions and unpaired
        layers) with :class:`~openautoglm.kv.stores.QuantStore`; ``bits=None`` keeps full precision.
    """

    def __init__(
        self,
        start_layer: int | None = None,
        threshold: float = 0.9,
        *,
        t: float = 0.5,
        min_shared: float = 0.5,
        config=None,
        num_layers: int | None = None,
        bits: int | None = None,
        group_size: int = 64,
        residual_length: int | str = "auto",
    ) -> None:
        n = layer_count(config, num_layers)
        if n is None:
            raise ValueError("CrossLayerKVCache needs the model's config= (or num_layers=) to pair its layers")
        if n < 2:
            raise ValueError(f"cross-layer sharing needs at least 2 layers, the model has {n}")
        start = n // 2 if start_layer is None else start_layer
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= n - 2:
            raise ValueError(f"start_layer={start_layer!r} must be an integer in [0, {n - 2}] for a {n}-layer model")
        threshold = C.number("threshold (a cosine)", threshold, min=-1.0, max=1.0)
        min_shared = C.number("min_shared", min_shared, min=0.0, max=1.0)
        t = C.number("t", t, min=0.0, max=1.0)
        if bits is not None:
            validate_quant_args(bits, group_size, 0 if residual_length == "auto" else residual_length)
            make = lambda: QuantStore(bits, group_size, residual_length)  # noqa: E731
        else:
            make = FullStore
        self.start_layer, self.threshold, self.t, self.bits = start, float(threshold), t, bits
        self.min_shared = min_shared
        self.group_size, self.residual_length = group_size, residual_length
        self.pairs: list[_Pair] = []
        layers: list[KVLayer] = []
        for i in range(n):
            if i >= start and (i - start) % 2 == 0 and i + 1 < n:
                self.pairs.append(_Pair((i, i + 1), self.threshold, t, make, min_shared))
                layers.append(KVLayer(_PairSlot(self.pairs[-1], "a")))
            elif i > start and (i - start) % 2 == 1:
                layers.append(KVLayer(_PairSlot(self.pairs[-1], "b")))
            else:
                layers.append(KVLayer(make()))
        super().__init__(layers=layers, config=config)
        self._prev = None
        self.prefill_similarity: dict[str, dict[str, float]] = {}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # Record how similar each layer's K/V are to the previous layer's during the first forward.
        if self.get_seq_length() == 0 or (self._prev is not None and layer_idx > 0):
            self._record_similarity(key_states, value_states, layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @torch.no_grad()
    def _record_similarity(self, key_states, value_states, layer_idx: int) -> None:
        if self._prev is not None and self._prev[0] == layer_idx - 1:
            pk, pv = self._prev[1:]
            cos_k = torch.nn.functional.cosine_similarity(pk.float(), key_states.float(), dim=-1).mean()
            cos_v = torch.nn.functional.cosine_similarity(pv.float(), value_states.float(), dim=-1).mean()
            self.prefill_similarity[f"{layer_idx - 1}-{layer_idx}"] = {"k": float(cos_k), "v": float(cos_v)}
        self._prev = (layer_idx, key_states, value_states) if layer_idx < len(self.layers) - 1 else None

    def reset(self) -> None:
        super().reset()
        self._prev = None
        self.prefill_similarity = {}

    def report(self) -> dict:
        """Which layers share a store, the fraction of (token, head) entries shared, prefill similarity, bytes."""
        pairs = []
        for p in self.pairs:
            tot = max(p.total_count, 1)
            pairs.append({
                "layers": list(p.layers),
                "shared": p.split is None,
                "shared_fraction_k": p.merged_count["k"] / tot,
                "shared_fraction_v": p.merged_count["v"] / tot,
            })
        return {
            "start_layer": self.start_layer,
            "threshold": self.threshold,
            "bits": self.bits,
            "pairs": pairs,
            "prefill_similarity": self.prefill_similarity,
            "bytes": self.nbytes(),
        }
