"""Models bigger than the machine: load + quantize a 13B-shaped checkpoint, eager vs streaming, in ONE run.

Writes a random-weight Llama-2-13B-shaped checkpoint (bf16, 5 GB safetensors shards, generated tensor by
tensor on the device and written at its place in pre-laid-out shards), then runs each variant in a SEPARATE
process, one after the other, on the same (page-cached) files:

* ``empty``      python + torch + CUDA init, nothing else: the host-RSS baseline;
* ``a-w4``       transformers ``from_pretrained(device_map=device)`` of the bf16 model, then our ``quantize`` (w4);
* ``b-w4``       our lazy quantize-on-load, ``from_pretrained(path, device=..., quantization=QuantConfig("w4"))``;
* ``b-w8a8``     the same with w8a8 (int8 weights, per-channel);
* ``c-ao-int4``  torchao through transformers (``TorchAoConfig(Int4WeightOnlyConfig(...))``), if importable;
* ``a-w8a8``     transformers + our ``quantize`` (w8a8), last, if there is time.

Each child reports wall time of the load(+quantize) call, peak host RSS (``VmHWM``), peak GPU memory
(``max_memory_allocated`` and ``_reserved``), the final model bytes, and saves the packed tensors of three
layers; the parent checks that (a) and (b) packed tensors are identical and that (b) equals the in-memory
quantizer layer by layer. JSON is rewritten after every child.

    python -m benchmarks.hub.stream --shape tiny --device cpu      # CPU check of the script
    python -m benchmarks.hub.stream --shape 13b --device cuda --workdir /tmp/sb

Writes stream.json to ``--out`` (default ``$OUT/hub``, else benchmarks/results/hub; a temporary folder for
``--shape tiny``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks._harness import ROOT, environment as _environment, out_dir, write_json

SHAPES = {  # Llama-2-13B: hidden 5120, MLP 13824, 40 layers, 40 heads (no GQA), vocab 32000
    "13b": dict(hidden=5120, inter=13824, layers=40, heads=40, kv_heads=40, vocab=32000, shard="5GB"),
    "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32000, shard="5GB"),
    "tiny": dict(hidden=256, inter=704, layers=4, heads=4, kv_heads=2, vocab=1024, shard="1MB"),
}
VARIANTS = ["empty", "b-w4", "a-w4", "b-w8a8", "c-ao-int4", "a-w8a8"]
SAMPLE = ("self_attn.q_proj", "mlp.down_proj")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            out[k] = int(v.split()[0]) * 1024
    return out


# ----------------------------------------------------------------------------- the checkpoint

def write_checkpoint(folder: Path, shape: dict, device: str) -> dict:
    import torch
    from transformers import LlamaConfig

    from openautoglm import hub
    from openautoglm.hub.writer import StreamingWriter
    from openautoglm.quant.pretrained import _size

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=False,
                dtype="bfloat16").save_pretrained(folder)
    empty = hub.empty_model(folder)
    writer = StreamingWriter(folder, empty, _size(shape["shard"]))
    g = torch.Generator(device).manual_seed(0)
    state = empty.state_dict()
    pending = []
    with ThreadPoolExecutor(4) as pool:  # generate on the device, copy out and pwrite in 4 threads
        for name in sorted(writer.where):
            t = torch.empty(state[name].shape, dtype=torch.bfloat16, device=device).uniform_(-0.03, 0.03, generator=g)
            pending.append(pool.submit(writer.write, name, t + 1 if name.endswith("norm.weight") else t))
            while len(pending) > 8:
                pending.pop(0).result()
        for f in pending:
            f.result()
    writer.close()
    files = sorted(folder.glob("*.safetensors"))
    return {"seconds": time.perf_counter() - t0, "bytes": sum(f.stat().st_size for f in files), "shards": len(files)}


# ----------------------------------------------------------------------------- one variant (child process)

def _sample_packed(model, layers: int) -> dict:
    from openautoglm import _hf

    out = {}
    blocks = _hf.decoder_layers(model)
    for i in sorted({0, layers // 2, layers - 1}):
        for sub in SAMPLE:
            mod = blocks[i].get_submodule(sub)
            for pname, p in mod.named_parameters(recurse=False):
                if pname != "bias":
                    out[f"{i}.{sub}.{pname}"] = p.detach().cpu().contiguous()
    return out


def _inmemory_check(model, ckpt: Path, scheme: str, layers: int, device: str) -> bool:
    """Re-quantize the float weights of the sampled layers with the in-memory path; compare packed tensors."""
    import torch
    from safetensors import safe_open
    from torch import nn

    from openautoglm import hub, _hf
    from openautoglm.quant import LINEAR_CLASSES, QuantConfig

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"] \
        if (ckpt / "model.safetensors.index.json").exists() else None
    cfg = QuantConfig(scheme=scheme)
    prefix = hub.lazy.layers_prefix(model)
    for i in sorted({0, layers // 2, layers - 1}):
        for sub in SAMPLE:
            name = f"{prefix}.{i}.{sub}.weight"
            got = _hf.decoder_layers(model)[i].get_submodule(sub)
            if isinstance(got, nn.Linear):  # skipped by the quantizer (e.g. a group that does not divide)
                continue
            f = ckpt / (index[name] if index else "model.safetensors")
            with safe_open(str(f), "pt") as h:
                w = h.get_tensor(name).to(device)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
            lin.weight = nn.Parameter(w, requires_grad=False)
            ref = LINEAR_CLASSES[scheme].from_linear(lin, cfg)
            for pname, p in ref.named_parameters(recurse=False):
                a, b = p.detach(), getattr(got, pname).detach()
                if a.dtype != b.dtype or not torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b):
                    return False
    return True


def child(variant: str, ckpt: Path, device: str, layers: int, workdir: Path) -> dict:
    import torch

    res: dict = {"variant": variant}
    cuda = device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=device)
        torch.cuda.reset_peak_memory_stats()
    if variant == "empty":
        res.update(status())
        return res
    import transformers  # noqa: F401  (imports outside the timed part, as for a user's session)

    from openautoglm.memory.estimate import model_bytes
    from openautoglm.quant import QuantConfig, quantize

    res["rss_after_imports"] = status()["VmRSS"]
    kind, _, scheme = variant.partition("-")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    if kind == "a":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map=device)
        sync()
        res["load_seconds"] = time.perf_counter() - t0
        res["load_peak_gpu"] = torch.cuda.max_memory_allocated() if cuda else None
        quantize(model, QuantConfig(scheme=scheme))
    elif kind == "b":
        from openautoglm import from_pretrained

        model = from_pretrained(ckpt, device=device, quantization=QuantConfig(scheme=scheme), progress=False)
    else:  # c: torchao through transformers
        from torchao.quantization import Int4WeightOnlyConfig
        from transformers import AutoModelForCausalLM, TorchAoConfig

        qc = TorchAoConfig(Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map=device,
                                                     quantization_config=qc)
    sync()
    res["seconds"] = time.perf_counter() - t0
    res.update(status())
    res["final_bytes"] = model_bytes(model)
    if cuda:
        res["peak_gpu_allocated"] = torch.cuda.max_memory_allocated()
        res["peak_gpu_reserved"] = torch.cuda.max_memory_reserved()
        res["peak_gpu_over_final"] = res["peak_gpu_allocated"] / res["final_bytes"]
    if kind in ("a", "b"):
        from safetensors.torch import save_file

        save_file(_sample_packed(model, layers), str(workdir / f"{variant}.packed.safetensors"))
    if kind == "b":
        res["equals_inmemory_quantizer"] = _inmemory_check(model, ckpt, scheme, layers, device)
    return res


# ----------------------------------------------------------------------------- parent

def compare_packed(workdir: Path, a: str, b: str) -> dict | None:
    import torch
    from safetensors.torch import load_file

    fa, fb = workdir / f"{a}.packed.safetensors", workdir / f"{b}.packed.safetensors"
    if not (fa.exists() and fb.exists()):
        return None
    ta, tb = load_file(str(fa)), load_file(str(fb))
    same = ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.uint8) if ta[k].dim() else ta[k],
                                                   tb[k].view(torch.uint8) if tb[k].dim() else tb[k]) for k in ta)
    return {"tensors": sorted(ta), "identical": bool(same)}


def environment(device: str, peer_path: str = "") -> dict:
    """The harness's record, with torchao's version read from its dist-info (it may sit in ``peer_path``, a folder
    the ``c-*`` children alone get on their path, so it is not imported here)."""
    env = {**_environment(device), "host_cpus": os.cpu_count(), "torchao": None}
    for site in filter(None, [peer_path, *sys.path]):
        found = sorted(Path(site).glob("torchao-*.dist-info")) if Path(site).is_dir() else []
        if found:
            env["torchao"] = found[0].name.removesuffix(".dist-info").split("-")[1]
            break
    return env


def summarize(res: dict) -> list[str]:
    base = res["runs"].get("empty", {}).get("VmHWM")
    lines = [f"{'variant':<11} {'seconds':>8} {'host RSS over empty':>20} {'peak GPU GB':>12} {'final GB':>9} {'peak/final':>10}"]
    for v, r in res["runs"].items():
        if v == "empty" or "seconds" not in r:
            continue
        over = (r["VmHWM"] - base) / 1e9 if base else float("nan")
        gpu = r.get("peak_gpu_allocated")
        lines.append(f"{v:<11} {r['seconds']:8.1f} {over:17.2f} GB {gpu / 1e9 if gpu else float('nan'):12.2f} "
                     f"{r['final_bytes'] / 1e9:9.2f} {r.get('peak_gpu_over_final', float('nan')):10.3f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/stream_bench"))
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default: stream.json in $OUT/hub, else in "
                    "benchmarks/results/hub)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--peer-path", default="", help="site folder holding torchao, added for the c-* runs only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    ckpt = args.workdir / "ckpt"
    if args.child:
        print("RESULT " + json.dumps(child(args.child, ckpt, args.device, shape["layers"], args.workdir)), flush=True)
        return

    args.out = args.out or out_dir("hub", args.shape == "tiny") / "stream.json"
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    res = {"benchmark": "stream_bench", "shape": args.shape, **{"config": shape}, "env": environment(args.device, args.peer_path),
           "runs": {}, "identity": {}}
    log(f"writing a random {args.shape} checkpoint to {ckpt}")
    res["checkpoint"] = write_checkpoint(ckpt, shape, args.device)
    log(f"checkpoint: {res['checkpoint']}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    for variant in args.variants.split(","):
        if variant.startswith("c-") and res["env"]["torchao"] is None and not args.peer_path:
            res["runs"][variant] = {"skipped": "torchao is not installed"}
            continue
        t0 = time.perf_counter()
        child_env = dict(env)
        if variant.startswith("c-") and args.peer_path:
            child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), args.peer_path]))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.hub.stream", "--child", variant, "--shape", args.shape,
                               "--device", args.device, "--workdir", str(args.workdir)], capture_output=True, text=True,
                              env=child_env, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            res["runs"][variant] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            log(f"{variant} FAILED:\n{(proc.stderr or proc.stdout)[-2000:]}")
        else:
            res["runs"][variant] = {**json.loads(line[7:]), "process_seconds": time.perf_counter() - t0}
            log(f"{variant}: {res['runs'][variant]}")
        for s in ("w4", "w8a8"):
            cmp = compare_packed(args.workdir, f"a-{s}", f"b-{s}")
            if cmp:
                res["identity"][f"a-{s} vs b-{s}"] = cmp
        write_json(args.out, res, indent=2)
    res["summary"] = summarize(res)
    write_json(args.out, res, indent=2)
    print("\n".join(res["summary"]))
    print(json.dumps(res["identity"], indent=1))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
