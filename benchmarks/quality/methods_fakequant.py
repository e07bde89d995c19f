"""Early measurement of the calib methods as fake quantization: perplexity change and time, real + bundled model.

Every decoder Linear (q/k/v/o, gate/up/down; not the tied lm_head) is replaced by the float values of its codes,
layer by layer (:mod:`.sequential`), so GPTQ/AWQ see the already quantized earlier layers. W8A8 also fake-quantizes
each Linear's input per token (symmetric int8). Perplexity on the evaluation half of the held-out text
(:mod:`.realmodel`), calibration on the other half. Peers on the same model and text where installed: the hqq
package's own quantizer (fake quantization with its codes) and optimum-quanto (its modules).

    nice python -m benchmarks.quality.methods_fakequant --model smollm2 [--variants a,b] [--eval-tokens 8192]

Writes/merges ``benchmarks/results/quality/methods_fakequant.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from benchmarks._harness import RESULTS, environment, write_json

from . import realmodel
from .sequential import LINEARS, fake_quantize_model

OUT = RESULTS / "quality" / "methods_fakequant.json"

# name -> (method, bits, group, kwargs)
VARIANTS = {
    "rtn-w4-g64": ("rtn", 4, 64, {}),
    "rtn-w4-g64-intzero": ("rtn", 4, 64, {"zero_point": "int"}),
    "rtn-w4-g64-sym": ("rtn", 4, 64, {"symmetric": True}),
    "hqq-w4-g64": ("hqq", 4, 64, {}),
    "gptq-w4-g64": ("gptq", 4, 64, {}),
    "gptq-w4-g64-actorder": ("gptq", 4, 64, {"act_order": True}),
    "awq-w4-g64": ("awq", 4, 64, {}),
    "rtn-w3-g64": ("rtn", 3, 64, {}),
    "hqq-w3-g64": ("hqq", 3, 64, {}),
    "gptq-w3-g64": ("gptq", 3, 64, {}),
    "gptq-w3-g64-actorder": ("gptq", 3, 64, {"act_order": True}),
    "awq-w3-g64": ("awq", 3, 64, {}),
    "w8a8": ("w8a8", 8, None, {}),
    "w8a8-smooth": ("w8a8-smooth", 8, None, {}),
    "rtn-w4-g128pad": ("rtn", 4, 128, {}),
    "gptq-w4-g128pad": ("gptq", 4, 128, {}),
    "rtn-w4-g32": ("rtn", 4, 32, {}),
    "rtn-w4-g32-sym": ("rtn", 4, 32, {"symmetric": True}),
    "gptq-w4-g32": ("gptq", 4, 32, {}),
    "rtn-w2-g64": ("rtn", 2, 64, {}),
    "hqq-w2-g64": ("hqq", 2, 64, {}),
    "gptq-w2-g64": ("gptq", 2, 64, {}),
    "awq+gptq-w4-g64": ("awq+gptq", 4, 64, {}),
    "awq+gptq-w3-g64": ("awq+gptq", 3, 64, {}),
    "gptq-w4-g64-sym": ("gptq", 4, 64, {"symmetric": True}),
    "gptq-w4-g64-intzero": ("gptq", 4, 64, {"zero_point": "int"}),
}
PEERS = ("peer-hqq-w4-g64", "peer-hqq-w3-g64", "peer-quanto-int4", "peer-quanto-int8")


def load(name: str):
    if name == "smollm2":
        return realmodel.load_smollm2()
    from openautoglm import AutoModelForCausalLM
    from openautoglm.hub import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained("open-autoglm-base").float().eval()
    return model, load_tokenizer("open-autoglm-base")


def apply_peer(model, name: str) -> dict:
    if name.startswith("peer-hqq"):
        from hqq.core.quantize import Quantizer
        import hqq

        bits = int(name.split("-w")[1][0])
        for layer in model.model.layers:
            for n in LINEARS:
                lin = layer.get_submodule(n)
                w = lin.weight.data.float()
                wq, meta = Quantizer.quantize(w, nbits=bits, group_size=64, optimize=True, round_zero=bits == 4,
                                              axis=1, bitpack=False, device="cpu")
                lin.weight.data = ((wq.float() - meta["zero"]) * meta["scale"]).reshape(w.shape)
        return {"package": f"hqq {hqq.__version__}", "how": "Quantizer.quantize(nbits, group_size=64, axis=1, "
                "optimize=True, round_zero=nbits==4), dequantized into the float Linears"}
    from optimum.quanto import freeze, qint4, qint8, quantize
    import optimum.quanto as oq

    quantize(model, weights=qint4 if name.endswith("int4") else qint8, exclude=["lm_head"])
    freeze(model)
    return {"package": f"optimum-quanto {getattr(oq, '__version__', '?')}", "how": "quantize(weights=..., "
            "exclude=lm_head) + freeze, default group size"}


def meta() -> dict:
    """The harness's record of where this ran, with the torch thread count (CPU figures depend on it)."""
    return {**environment("cpu"), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "bundled"])
    ap.add_argument("--variants", default="all")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(OUT), help="JSON to merge into (one entry per model)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    names = list(VARIANTS) + list(PEERS) if args.variants == "all" else args.variants.split(",")
    model, tok = load(args.model)
    ev = realmodel.eval_windows(tok, args.seq_len, args.eval_tokens)
    cal = realmodel.calibration_windows(tok, args.calib_windows, args.seq_len)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    entry = data.setdefault(args.model, {})
    entry.update({"meta": meta(), "eval_tokens": int(ev.numel()), "eval_windows": list(ev.shape),
                  "calibration": {"windows": args.calib_windows, "seq_len": args.seq_len, "tokens": int(cal.numel())},
                  "text": "bundled held-out text split by document: odd documents calibrate, even documents evaluate"})
    results = entry.setdefault("results", {})
    if "fp32" not in results or results["fp32"].get("eval_tokens") != int(ev.numel()):
        t = time.perf_counter()
        results["fp32"] = {"perplexity": realmodel.perplexity(model, ev), "eval_tokens": int(ev.numel()),
                           "eval_s": time.perf_counter() - t}
    base = results["fp32"]["perplexity"]
    print(f"{args.model} fp32 perplexity {base:.4f}", flush=True)
    for name in names:
        model, _ = (model, None)
        fresh = load(args.model)[0] if name.startswith("peer-quanto") else model
        fresh.load_state_dict(state)
        for m in fresh.modules():  # drop act-quant hooks of an earlier W8A8 variant
            m._forward_pre_hooks.clear()
        t = time.perf_counter()
        try:
            if name in VARIANTS:
                method, bits, group, kw = VARIANTS[name]
                info = fake_quantize_model(fresh, cal, method, bits, group, **kw)
                rec = {"method": method, "bits": bits, "group_size": group, **kw}
                if info.get("alpha"):
                    rec["alpha_mean"] = sum(info["alpha"]) / len(info["alpha"])
            else:
                rec = apply_peer(fresh, name)
        except Exception as e:  # noqa: BLE001 - a peer may not run here; record why
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: {results[name]['error']}", flush=True)
            continue
        rec["quantize_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ppl = realmodel.perplexity(fresh, ev)
        rec.update({"perplexity": ppl, "change_pct": 100 * (ppl / base - 1), "eval_s": time.perf_counter() - t})
        results[name] = rec
        print(f"{name:24s} ppl {ppl:8.4f}  {rec['change_pct']:+7.2f}%  quantize {rec['quantize_s']:6.1f} s", flush=True)
        _save(out, args.model, entry)
        if fresh is not model:
            del fresh
    _save(out, args.model, entry)


def _save(out: Path, model: str, entry: dict) -> None:
    """Re-read and replace only this model's entry, so runs of the two models can share the file."""
    data = json.loads(out.read_text()) if out.exists() else {}
    data[model] = entry
    write_json(out, data, sort_keys=True)


if __name__ == "__main__":
    main()
