"""One rank of the multi-process tensor-parallel checks (started by test_parallel_multiprocess.py via torchrun).

Every check runs the unsharded model in this same process as the single-process reference, then the sharded one,
and records numbers (never a verdict); rank 0 gathers all ranks' records into ``OUT/results.json`` for pytest.
Process start-up dominates on CI, so one launch of 4 ranks serves the 4-way checks and, through a (2, 2) device
mesh, the 2-way ones.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest helpers)
from conftest import make_tiny_llama  # noqa: E402

from openautoglm import hub, parallel  # noqa: E402
from openautoglm.memory.estimate import estimate_memory, model_bytes  # noqa: E402
from openautoglm.quant.api import quantize  # noqa: E402
from openautoglm.quant.config import QuantConfig  # noqa: E402

SCHEMES = {"float": None, "w8": QuantConfig(scheme="w8", group_size=32), "w4": QuantConfig(scheme="w4", group_size=32),
           "w8a8": QuantConfig(scheme="w8a8")}
IDS = torch.randint(2, 8192, (2, 24), generator=torch.Generator().manual_seed(7))


def _model(scheme: str, **kw):
    m = make_tiny_llama(**kw)
    if SCHEMES[scheme] is not None:
        quantize(m, SCHEMES[scheme])
    return m


@torch.no_grad()
def _compare(ref, sharded, ids=IDS) -> dict:
    want, got = ref(ids).logits, sharded(ids).logits
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0)
    return {"max_abs": (got - want).abs().max().item(), "ref_max": want.abs().max().item(), "cos": cos.item(),
            "argmax_equal": bool(torch.equal(got.argmax(-1), want.argmax(-1)))}


def check_logits(scheme: str, tp: int) -> dict:
    ref = _model(scheme)
    out = _compare(ref, parallel.shard(copy.deepcopy(ref), tp_size=tp))
    if scheme == "w8a8":  # per-rank activation scales: compare both errors against the float model
        flt = _model("float")
        with torch.no_grad():
            f = flt(IDS).logits
            out["single_err"] = (ref(IDS).logits - f).abs().max().item()
            out["sharded_err"] = (parallel.shard(copy.deepcopy(ref), tp_size=tp)(IDS).logits - f).abs().max().item()
    return out


def check_functional_path() -> dict:
    """With grad enabled the hooks take PyTorch's functional collectives (the path torch.compile traces)."""
    ref = _model("float")
    m = parallel.shard(copy.deepcopy(ref), tp_size=4)
    with torch.enable_grad():
        got = m(IDS).logits.detach()
    with torch.no_grad():
        want = ref(IDS).logits
    return {"max_abs": (got - want).abs().max().item(), "ref_max": want.abs().max().item()}


def check_biases_and_replicated_vocab() -> dict:
    """q/k/v/o and MLP biases (a row-parallel bias is added once, on rank 0), and vocab="replicate"."""
    ref = make_tiny_llama(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    out = _compare(ref, parallel.shard(copy.deepcopy(ref), tp_size=4))
    rep = parallel.shard(copy.deepcopy(ref), config=parallel.ShardConfig(tp_size=4, vocab="replicate"))
    out["replicate"] = _compare(ref, rep)
    out["replicate"]["embedding_rows"] = rep.get_input_embeddings().weight.shape[0]
    return out


def check_bytes(scheme: str) -> dict:
    ref = _model(scheme)
    m = parallel.shard(copy.deepcopy(ref), tp_size=4)
    cut = set(m.shard_plan.tensors)
    cut.discard("lm_head.weight")  # tied in some models: counted once, with the embedding

    def size(model):
        return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n in cut)

    full_cut, held_cut = size(ref), size(m)
    est = estimate_memory(ref, mode="inference", tp_degree=4, dtype="fp32", batch=2, seq_len=24)
    cache = _kv_after_prefill(m)
    return {"measured": model_bytes(m), "full": model_bytes(ref), "estimate_weights": est.terms["weights"],
            "sharded_part_ratio": held_cut / full_cut, "planned": m.shard_plan.held(ref)["bytes"],
            "kv_measured": cache, "kv_estimate": est.terms["kv_cache"]}


@torch.no_grad()
def _kv_after_prefill(model) -> int:
    from transformers import DynamicCache

    from openautoglm import _hf

    cache = DynamicCache(config=model.config)
    _hf.forward_with_cache(model, IDS, cache)
    return sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))


@torch.no_grad()
def check_kv_cache() -> dict:
    from openautoglm import _hf
    from openautoglm.kv import KVCacheConfig

    kv = KVCacheConfig(bits=4, group_size=16, residual_length=8)
    ref = _model("float")
    m = parallel.shard(copy.deepcopy(ref), tp_size=4)
    outs, nbytes = [], []
    for model in (ref, m):
        cache = kv.build(model.config)
        outs.append(_hf.generate_with_cache(model, IDS[:1, :20], cache, max_new_tokens=24, do_sample=False,
                                            pad_token_id=1))
        nbytes.append(cache.nbytes())
    return {"tokens_equal": bool(torch.equal(outs[0], outs[1])), "new_tokens": outs[0].shape[1] - 20,
            "kv_bytes_ratio": nbytes[1] / nbytes[0]}


def check_loading(path: str) -> dict:
    ref = hub.from_pretrained(path)
    m = parallel.from_pretrained(path, tp_size=4)
    return {**_compare(ref, m), **m.shard_load_stats, "measured": model_bytes(m), "full": model_bytes(ref)}


def check_pruned_uneven() -> dict:
    from openautoglm.prune import remove_heads

    ref = _model("float")
    remove_heads(ref, {0: [0], 1: [1, 2], 3: [5]})
    m = parallel.shard(copy.deepcopy(ref), config=parallel.ShardConfig(tp_size=4, allow_uneven=True))
    return {**_compare(ref, m), "q_heads": [s.n_q for s in m.shard_plan.layers]}


def check_low_rank() -> dict:
    from openautoglm.prune.lowrank import low_rank_factors, replace_with_low_rank

    ref = _model("float")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.2.mlp.up_proj"):
        up, down = low_rank_factors(ref.get_submodule(name).weight, 16)
        replace_with_low_rank(ref, name, up.float(), down.float())
    return _compare(ref, parallel.shard(copy.deepcopy(ref), tp_size=4))


def check_error() -> dict:
    m = make_tiny_llama(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    try:
        parallel.shard(m)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def check_cli(path: str, out: Path) -> dict:
    from openautoglm.cli import main
    from openautoglm.evaluate import perplexity

    buf, js = io.StringIO(), out / f"ppl_rank{dist.get_rank()}.json"
    with contextlib.redirect_stdout(buf):
        code = main(["eval", path, "--tp", "4", "--max-tokens", "300", "--seq-len", "64", "--json", str(js)])
    ref = perplexity(hub.from_pretrained(path), hub.load_tokenizer(path), max_tokens=300, seq_len=64, progress=False)
    got = json.loads(js.read_text())["perplexity"] if js.exists() else None
    return {"code": code, "stdout": buf.getvalue(), "ppl": got, "ref_ppl": ref.perplexity}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", required=True)
    ap.add_argument("--tiny-w4", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    parallel.init_distributed("cpu")
    out = Path(args.out)
    checks = {f"logits_{s}_tp{tp}": (lambda s=s, tp=tp: check_logits(s, tp))
              for tp in (4, 2) for s in SCHEMES if not (tp == 2 and s == "w8a8")}
    checks.update({
        "bytes_float": lambda: check_bytes("float"), "bytes_w4": lambda: check_bytes("w4"),
        "kv_cache": check_kv_cache, "load_float": lambda: check_loading(args.tiny),
        "load_w4": lambda: check_loading(args.tiny_w4), "pruned_uneven": check_pruned_uneven,
        "low_rank": check_low_rank, "functional": check_functional_path, "bias": check_biases_and_replicated_vocab, "error": check_error, "cli_eval": lambda: check_cli(args.tiny, out),
    })
    results = {}
    for name, fn in checks.items():
        try:
            results[name] = fn()
        except Exception as e:  # recorded for pytest to show; the other checks still run
            results[name] = {"exception": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(gathered, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
