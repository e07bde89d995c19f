"""2:4 semi-structured sparsity on the GPU: speed of a 7B-shaped MLP vs dense at prefill sizes, and bytes.

    python -m benchmarks.prune.semi_structured_gpu            # on a CUDA GPU (H100)
    python -m benchmarks.prune.semi_structured_gpu --smoke    # CPU: tiny shapes, dense stand-in, checks the code

Weights: LLaMA-7B MLP (hidden 4096, intermediate 11008), bf16, pruned 2:4 by magnitude, converted with
``torch.sparse.to_sparse_semi_structured`` (CUTLASS and cuSPARSELt backends). Times are CUDA-event medians
of 20 single calls after 5 warm-ups, and of 5 runs of 10 calls queued back to back ("_queued")
(:func:`benchmarks._harness.event_ms`). Also converts the bundled model's 2:4-pruned linears and reports its bytes
and the logits' agreement with the dense-masked model. Writes semi_structured_gpu.json to ``--out`` (default
``$OUT/prune``, else benchmarks/results/prune).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._harness import environment, event_ms, out_dir, write_json
from openautoglm.prune.semi_structured import semi_structured_bytes, to_semi_structured
from openautoglm.prune.sparsity import nm_mask


def default_backend() -> str:
    """CUTLASS 2:4 kernels run only on sm8x; Hopper (sm90) needs cuSPARSELt."""
    return "cutlass" if torch.cuda.get_device_capability()[0] == 8 else "cusparselt"


def mlp(x, g, u, d):
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


def layer_bench(args, device, dtype):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    hidden, inter = (4096, 11008) if not args.smoke else (64, 128)
    tokens = [1024, 2048, 4096, 8192] if not args.smoke else [32, 64]
    g = torch.Generator(device="cpu").manual_seed(0)
    dense = {n: torch.randn(s, generator=g).to(device, dtype) * 0.02
             for n, s in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)))}
    masked = {n: w * nm_mask(w.float().abs()).to(dtype) for n, w in dense.items()}
    rows, bytes_rows = [], []
    backends = ["cutlass", "cusparselt"] if not args.smoke else ["dense-stand-in"]
    for backend in backends:
        if args.smoke:
            sparse = dict(masked)
        else:
            SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
            try:
                sparse = {n: to_sparse_semi_structured(w) for n, w in masked.items()}
            except Exception as e:  # noqa: BLE001 - a backend missing from this build is reported, not fatal
                rows.append({"backend": backend, "error": f"{type(e).__name__}: {e}"})
                continue
        bytes_rows.append({"backend": backend, **{n: {"dense": masked[n].numel() * masked[n].element_size(),
                                                       "sparse": semi_structured_bytes(s)} for n, s in sparse.items()}})
        try:
            rows += _time_backend(args, backend, tokens, hidden, inter, masked, sparse, device, dtype)
        except Exception as e:  # noqa: BLE001
            rows.append({"backend": backend, "error": f"{type(e).__name__}: {e}"})
            print(backend, "failed:", e, flush=True)
    return rows, bytes_rows


def _time_backend(args, backend, tokens, hidden, inter, masked, sparse, device, dtype):
    rows = []
    for m in tokens:
        x = torch.randn(m, hidden, device=device, dtype=dtype)
        ref = mlp(x, masked["gate"], masked["up"], masked["down"]).float()
        out = mlp(x, sparse["gate"], sparse["up"], sparse["down"]).float()
        rel = float((out - ref).norm() / ref.norm())
        row = {"backend": backend, "tokens": m, "rel_err_vs_dense_masked": rel}
        for name, fn_d, fn_s in (
            ("gate_proj", lambda: F.linear(x, masked["gate"]), lambda: F.linear(x, sparse["gate"])),
            ("down_proj", lambda: F.linear(xi, masked["down"]), lambda: F.linear(xi, sparse["down"])),
            ("mlp", lambda: mlp(x, masked["gate"], masked["up"], masked["down"]),
             lambda: mlp(x, sparse["gate"], sparse["up"], sparse["down"])),
        ):
            xi = torch.randn(m, inter, device=device, dtype=dtype)
            td, ts = event_ms(fn_d, cuda=not args.smoke), event_ms(fn_s, cuda=not args.smoke)
            row[f"{name}_dense_ms"], row[f"{name}_sparse_ms"], row[f"{name}_speedup"] = td, ts, td / ts
            td = event_ms(fn_d, reps=5, cuda=not args.smoke, inner=10)
            ts = event_ms(fn_s, reps=5, cuda=not args.smoke, inner=10)
            row[f"{name}_dense_ms_queued"], row[f"{name}_sparse_ms_queued"] = td, ts
            row[f"{name}_speedup_queued"] = td / ts
        rows.append(row)
        print(f"{backend:10s} tokens {m:5d}  mlp dense {row['mlp_dense_ms']:.3f} ms  2:4 {row['mlp_sparse_ms']:.3f} ms"
              f"  x{row['mlp_speedup']:.2f}  (gate x{row['gate_proj_speedup']:.2f}, down x{row['down_proj_speedup']:.2f})"
              f"  queued x{row['mlp_speedup_queued']:.2f}  rel err {rel:.1e}", flush=True)
    return rows


def model_bench(args, device, dtype):
    from openautoglm import hub
    from openautoglm.evaluate import heldout_token_ids
    from openautoglm.prune import sparsify

    model = hub.from_pretrained("open-autoglm-base", dtype=dtype, device=device)
    tok = hub.load_tokenizer("open-autoglm-base")
    ids = heldout_token_ids(tok)[: 4 * 512].view(4, 512).to(device)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sparsify(model, method="magnitude", pattern="2:4", progress=False)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    info = to_semi_structured(model, backend=default_backend()) if not args.smoke else {"converted": [], "dense_bytes": 0, "sparse_bytes": 0}
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    nll = lambda lg: float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.size(-1)), ids[:, 1:].reshape(-1)))  # noqa: E731
    sparse_bytes = sum(semi_structured_bytes(p) if type(p.data) is not torch.Tensor else p.numel() * p.element_size()
                       for p in model.parameters())
    res = {"converted_modules": len(info["converted"]), "linear_dense_bytes": info["dense_bytes"],
           "linear_sparse_bytes": info["sparse_bytes"], "model_dense_bytes": dense_bytes,
           "model_sparse_bytes": sparse_bytes, "logits_rel_err": float((out - ref).norm() / ref.norm()),
           "ppl_dense_masked_2048tok": float(torch.tensor(nll(ref)).exp()),
           "ppl_semi_structured_2048tok": float(torch.tensor(nll(out)).exp())}
    print("bundled model:", json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None, help="the JSON (default: semi_structured_gpu.json in $OUT/prune, else in "
                    "benchmarks/results/prune)")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.bfloat16 if not args.smoke else torch.float32
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --smoke on a CPU")
    result = {"benchmark": "prune_24_gpu", "smoke": args.smoke, **environment(device),
              "dtype": str(dtype), "shape": "LLaMA-7B MLP: hidden 4096, intermediate 11008"}
    rows, bytes_rows = layer_bench(args, device, dtype)
    result["layer"] = rows
    result["layer_bytes"] = bytes_rows
    try:
        result["model"] = model_bench(args, device, dtype)
    except Exception as e:  # noqa: BLE001 - keep the layer figures even if the model conversion fails
        result["model"] = {"error": f"{type(e).__name__}: {e}"}
        print("model bench failed:", e, flush=True)
    out = Path(args.out) if args.out else out_dir("prune", args.smoke) / (
        "semi_structured_gpu_smoke.json" if args.smoke else "semi_structured_gpu.json")
    print("wrote", write_json(out, result, indent=2))


if __name__ == "__main__":
    main()
