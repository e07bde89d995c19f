"""Correctness checks of the KV kernels on the benchmark device, before any timing.

For fresh random keys/values/queries: the static store is filled by the host path, then decoded a few
tokens with the device append kernel next to a copy decoded with the float reference append (the two
states must agree: codes within one step, scales exactly); the Triton decode attention is compared with
the float reference on the same store (relative error, cosine), and the quantized attention with exact
attention over the unquantized keys/values (what quantization costs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openautoglm.kv.kernels import ops
from openautoglm.kv.static_store import StaticQuantStore

# (bits, group, residual, capacity, window, kv_heads, query heads per kv head, head_dim, batch, prefill, decode)
CONFIGS = [
    (4, 64, 128, 4096, 0, 32, 1, 128, 1, 3000, 3),   # 7B shapes (MHA)
    (8, 64, 128, 4096, 0, 32, 1, 128, 2, 1000, 3),
    (2, 64, 128, 4096, 0, 8, 4, 128, 2, 2000, 3),    # GQA
    (4, 32, 64, 2048, 512, 8, 4, 128, 1, 1500, 3),   # sliding window (ring of blocks)
]
SMOKE = [(4, 16, 16, 256, 0, 2, 1, 32, 1, 100, 2), (2, 16, 16, 256, 64, 2, 4, 32, 1, 150, 2)]


def _exact_attention(q, k, v, scale, lo):
    grp = q.shape[1] // k.shape[1]
    k, v = k[:, :, lo:].repeat_interleave(grp, 1).float(), v[:, :, lo:].repeat_interleave(grp, 1).float()
    p = torch.softmax((q.float() @ k.transpose(-1, -2)) * scale, -1)
    return (p @ v).transpose(1, 2)


@torch.no_grad()
def run(device: str, smoke: bool = False, dtype=torch.bfloat16) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for bits, g, r, cap, win, hkv, grp, d, b, pre, dec in (SMOKE if smoke else CONFIGS):
        k = torch.randn(b, hkv, pre + dec, d, device=device, dtype=dtype)
        v = torch.randn(b, hkv, pre + dec, d, device=device, dtype=dtype)
        k[..., 3] *= 8  # an outlier channel
        a, ref = StaticQuantStore(bits, g, r, cap, win), StaticQuantStore(bits, g, r, cap, win)
        for st in (a, ref):
            st.append(k[:, :, :pre], v[:, :, :pre])
        errs, cos_exact = [], []
        for t in range(pre, pre + dec):
            kt, vt = k[:, :, t : t + 1], v[:, :, t : t + 1]
            ops.append_token(a.view(), kt, vt)
            ops.append_reference(ref.view(), kt, vt)
            for st in (a, ref):
                st.length_t.add_(1)
                st._host_len = None
            q = torch.randn(b, hkv * grp, 1, d, device=device, dtype=dtype)
            got = ops.decode_attention(a.view(), q, None, d ** -0.5).float()
            want = ops.decode_reference(a.view(), q, None, d ** -0.5).float()
            errs.append(float((got - want).norm() / want.norm()))
            lo = max(0, t + 1 - win) if win else 0
            exact = _exact_attention(q, k[:, :, : t + 1], v[:, :, : t + 1], d ** -0.5, lo)
            cos_exact.append(float(F.cosine_similarity(got.flatten(), exact.flatten(), 0)))
        code_diff = max(int((x.int() - y.int()).abs().max()) for x, y in ((a.kq, ref.kq), (a.vq, ref.vq)))
        scale_diff = max(float((x.float() - y.float()).abs().max()) for x, y in
                         ((a.ks, ref.ks), (a.km, ref.km), (a.vs, ref.vs), (a.vm, ref.vm)))
        row = {"bits": bits, "group": g, "residual": r, "window": win, "kv_heads": hkv, "group_query_heads": grp,
               "head_dim": d, "batch": b, "tokens": pre + dec, "rel_err_vs_reference_max": max(errs),
               "cos_vs_exact_attention_min": min(cos_exact), "append_max_code_diff": code_diff,
               "append_max_scale_diff": scale_diff}
        row["ok"] = row["rel_err_vs_reference_max"] < 2e-2 and code_diff <= 1 and scale_diff < 1e-2
        rows.append(row)
        print("check", row, flush=True)
    return rows
