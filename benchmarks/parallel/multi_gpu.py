"""Tensor-parallel benchmark over several GPUs of one host: memory per GPU, decode, prefill, collectives.

    torchrun --nproc-per-node 2 -m benchmarks.parallel.multi_gpu                # 13B and 70B shapes, bf16 and w4
    torchrun --nproc-per-node 2 -m benchmarks.parallel.multi_gpu --shapes tiny --device cpu   # CPU check

Each rank builds only its own part: the model is made on the meta device (w4: every decoder Linear swapped for an
empty int4 layer, group 128), cut by :func:`openautoglm.parallel.make_plan` for this rank, then materialized on its
GPU with random weights (a 70B model never exists whole anywhere) and wired with its collectives (NCCL). Per shape
and variant: the weight bytes each GPU holds against ``estimate_memory(tp_degree=N)``, decode tokens/s at batch 1
and 8 (static KV cache, the step captured in one CUDA graph with its all-reduces: the decode loop of
:mod:`benchmarks.quant.bench_lib`; eager on the CPU), prefill of 2048 tokens, and the latency of one all-reduce of a
decode-sized activation. A small fp32 model checks first that the split logits equal one process's. Rank 0 prints
a table and writes multi_gpu_tp<N>.json to ``--out`` (default ``$OUT/parallel``, else benchmarks/results/parallel; a
temporary folder for ``--shapes tiny``).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks._harness import environment, median_s, out_dir, write_json
from benchmarks.quant.bench_lib import Decoder
from openautoglm import parallel
from openautoglm.memory.estimate import estimate_memory, model_bytes

SHAPES = {  # Llama-2-13B (MHA) and Llama-2/3-70B-like (GQA 8) shapes; tiny for a CPU check
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1024),
}


def log(*a) -> None:
    if dist.get_rank() == 0:
        print(*a, flush=True)


def meta_model(shape: str, variant: str):
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # bf16 weights; the rotary buffers stay fp32, as when loaded
    try:
        with init_empty_weights(include_buffers=True):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    if variant == "w4":
        from openautoglm.quant.api import rebuild
        from openautoglm.quant.config import QuantConfig

        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        rebuild(model, {"config": QuantConfig(scheme="w4", group_size=128).to_dict(), "modules": names})
    return model


@torch.no_grad()
def materialize(model, device) -> None:
    """Random weights for this rank's (already cut) part: normal floats, random int4 codes, small scales."""
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(1234 + dist.get_rank())
    for name, p in model.named_parameters():
        if p.dtype == torch.uint8:
            p.copy_(torch.randint(0, 256, p.shape, generator=g, device=device, dtype=torch.uint8))
        elif name.endswith("scale"):
            p.fill_(0.002)
        elif p.ndim > 1:
            p.normal_(0, 0.02, generator=g)
        else:
            p.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    for m in model.modules():
        if hasattr(m, "_prepare_device"):
            m._prepare_device()


def timed_ms(fn, reps: int) -> float:
    """Median wall milliseconds of ``fn()`` on this rank, every rank starting each call together (a barrier)."""
    return 1e3 * median_s(fn, reps, warmup=1, before=dist.barrier)


def all_reduce_us(shape: tuple, device, dtype, reps: int = 50) -> float:
    x = torch.randn(shape, device=device).to(dtype)
    return 1e3 * timed_ms(lambda: [dist.all_reduce(x) for _ in range(reps)], 3) / reps


@torch.no_grad()
def logits_check(device) -> dict:
    """A small fp32 model split over all ranks gives the logits of one process (same seed on every rank)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**{**SHAPES["tiny"], "num_attention_heads": 8 * dist.get_world_size(),
                                          "hidden_size": 64 * dist.get_world_size(), "head_dim": 32,
                                          "num_key_value_heads": dist.get_world_size()})).to(device).eval()
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
    want = ref(ids).logits
    got = parallel.shard(copy.deepcopy(ref))(ids).logits
    return {"max_abs_diff": (got - want).abs().max().item(), "ref_max": want.abs().max().item()}


def bench(shape: str, variant: str, device, args) -> dict:
    tp = dist.get_world_size()
    model = meta_model(shape, variant)
    est = estimate_memory(model, mode="inference", tp_degree=tp, batch=1, seq_len=args.prompt + args.new)
    plan = parallel.make_plan(model, tp, dist.get_rank())
    parallel.apply_plan(model, plan)
    materialize(model, device)
    parallel.install(model, plan, dist.group.WORLD)
    model.eval()
    cuda = device.type == "cuda"
    held = torch.tensor([model_bytes(model)], device=device)
    dist.all_reduce(held, op=dist.ReduceOp.MAX)
    row = {"shape": shape, "variant": variant, "weight_bytes_per_gpu": int(held.item()),
           "estimate_weights_per_gpu": est.terms["weights"], "allocated_bytes": torch.cuda.memory_allocated() if cuda else None}
    hidden = SHAPES[shape]["hidden_size"]
    for b in args.batches:
        prompt = torch.randint(0, SHAPES[shape]["vocab_size"], (b, args.prompt),
                               generator=torch.Generator().manual_seed(b)).to(device)
        dec = Decoder(model, b, prompt, args.new)
        ms = timed_ms(dec.run, args.reps)
        row[f"decode_b{b}"] = {"tokens_per_s": b * args.new / ms * 1e3, "cuda_graph": dec.graph is not None,
                               "graph_error": dec.graph_error, "graph_matches_eager": dec.check()}
        row[f"all_reduce_b{b}_us"] = all_reduce_us((b, 1, hidden), device, torch.bfloat16)
        del dec
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (1, args.prefill), generator=torch.Generator().manual_seed(9))
    ids = ids.to(device)
    with torch.no_grad():
        row["prefill_ms"] = timed_ms(lambda: model(ids, use_cache=False, logits_to_keep=1), args.reps)
    row["all_reduce_prefill_us"] = all_reduce_us((1, args.prefill, hidden), device, torch.bfloat16, reps=10)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="13b,70b")
    ap.add_argument("--variants", default="bf16,w4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64, help="decode steps")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="the JSON (default: multi_gpu_tp<N>.json in $OUT/parallel, else in "
                    "benchmarks/results/parallel)")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    device = parallel.init_distributed(args.device)
    if not dist.is_initialized():
        raise SystemExit("run under torchrun --nproc-per-node N")
    res = {**environment(device), "world_size": dist.get_world_size(), "args": vars(args), "logits_check": logits_check(device),
           "rows": []}
    log(f"{res['device']} x{res['world_size']}: logits check {res['logits_check']}")
    for shape in args.shapes.split(","):
        for variant in args.variants.split(","):
            try:
                row = bench(shape, variant, device, args)
            except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
                row = {"shape": shape, "variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            res["rows"].append(row)
            log(json.dumps(row))
    if dist.get_rank() == 0:
        out = write_json(Path(args.out) if args.out else out_dir("parallel", "tiny" in args.shapes.split(","))
                         / f"multi_gpu_tp{dist.get_world_size()}.json", res, indent=2)
        print(f"\n{'shape':5} {'variant':7} {'GB/GPU':>7} {'est GB':>7} " +
              " ".join(f"{'b' + str(b) + ' tok/s':>10}" for b in args.batches) + f" {'prefill ms':>10} {'AR b1 us':>9}")
        for r in res["rows"]:
            if "error" in r:
                print(f"{r['shape']:5} {r['variant']:7} {r['error']}")
                continue
            print(f"{r['shape']:5} {r['variant']:7} {r['weight_bytes_per_gpu'] / 1e9:7.2f} {r['estimate_weights_per_gpu'] / 1e9:7.2f} "
                  + " ".join(f"{r[f'decode_b{b}']['tokens_per_s']:10.1f}" for b in args.batches)
                  + f" {r['prefill_ms']:10.1f} {r.get(f'all_reduce_b{args.batches[0]}_us', 0):9.1f}")
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
