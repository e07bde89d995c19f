"""``openautoglm info | eval | generate``."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from .. import _hf, hub
from ..memory.estimate import model_bytes
from ..memory.moe import summary as moe_summary
from ._app import app, console
from ._common import check_dtype, check_finite, check_json_out, fmt_bytes, pick_device, read_text_file, table

# Options shared by eval and generate (declared once).
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")]
DType = Annotated[str, typer.Option(help="auto (checkpoint's), bf16, fp16, fp32")]
KVBits = Annotated[Optional[int], typer.Option("--kv-bits", help="Quantize the KV cache: 8, 4 or 2 bits (KIVI).")]
KVGroupSize = Annotated[int, typer.Option("--kv-group-size", help="KV quantization group (tokens for keys, channels for values).")]
KVResidual = Annotated[str, typer.Option("--kv-residual", help="Most recent tokens kept in full precision, or "
                                                                "'auto' (sized to the context, at most 1/64 of it).")]
KVShare = Annotated[bool, typer.Option("--kv-share", help="Share KV across adjacent layers (MiniCache).")]
KVShareStart = Annotated[Optional[int], typer.Option("--kv-share-start", help="First shared layer (default: half the depth).")]
KVShareThreshold = Annotated[float, typer.Option("--kv-share-threshold", help="Cosine above which a token is shared.")]
KVShareLayers = Annotated[Optional[str], typer.Option(
    "--kv-share-layers", help="Calibrated sharing: 'SOURCE:LAYER,...', each LAYER reads the earlier SOURCE's cache "
    "(e.g. the pairs openautoglm.kv.search_sharing found).")]
TP = Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel ranks: run as `torchrun --nproc-per-node N "
                                 "-m openautoglm ... --tp N` (each rank holds 1/N of the model; rank 0 prints).")]


@app.command()
def info(
    model: str = typer.Argument(..., help="Shipped model name or local model folder."),
    batch: int = typer.Option(1, min=1, help="Batch size for the 'needs' rows."),
    context: int = typer.Option(2048, min=1, help="Context length (prompt + generated tokens)."),
    kv_dtype: str = typer.Option("bf16", help="KV cache element type: bf16, fp16, fp32."),
) -> None:
    """Parameters, layers, heads, dtype and a memory table (no weights are read)."""
    if kv_dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"--kv-dtype {kv_dtype!r} is not one of bf16, fp16, fp32")
    m = hub.empty_model(model)
    path = hub.resolve_model_path(model)
    disk = hub.checkpoint_tensors(path)  # headers only: a truncated or corrupt shard fails here, clearly
    if disk.n_files:
        hub.check_against_model(disk, m, path)
    elif not any((path / n).is_file() for n in hub.PICKLE_FILES):
        logging.getLogger("openautoglm.cli").warning("%s holds no weight files: the figures come from config.json", path)
    cfg = m.config
    n_params = _logical_parameters(m)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in m.parameters()})
    w = model_bytes(m)
    hidden = _hf.text_config(cfg).hidden_size
    inter = getattr(_hf.text_config(cfg), "intermediate_size", 4 * hidden)
    from ..memory.estimate import estimate_memory

    # prefill of batch x context tokens with a KV cache (memory.estimate: activations, last-token logits and
    # the KV cache of the layers as they are, pruned heads included)
    est = estimate_memory(m, mode="inference", batch=batch, seq_len=context, kv_dtype=kv_dtype)
    act = est.terms["activations"] + est.terms["logits"]
    kvc = est.terms["kv_cache"]
    kv1k = kvc * 1024 // (batch * context)
    transforms = hub.applied_transforms(cfg)
    moe = moe_summary(m, n_params)
    moe_rows = [] if moe is None else [
        ["parameters per token (active)", f"{moe['active']:,} ({moe['active'] / 1e6:.2f} M, "
                                          f"{moe['active'] / max(1, n_params):.1%} of all)"],
        ["experts", f"{'/'.join(map(str, moe['experts']))} per layer in {moe['layers']} MoE layers, top-"
                    f"{'/'.join(map(str, moe['top_k']))} per token"],
        ["experts' share of the bytes", f"{fmt_bytes(moe['experts_bytes'])} ({moe['experts_share']:.1%})"],
    ]
    console.print(table(
        f"{model}", ["property", "value"],
        [
            ["architecture", ", ".join(getattr(cfg, "architectures", None) or [cfg.model_type])],
            ["parameters", f"{n_params:,} ({n_params / 1e6:.2f} M)"],
            *moe_rows,
            ["layers", _hf.num_layers(cfg)],
            ["query heads / KV heads", _heads_summary(m)],
            ["head dim", _hf.head_dim(cfg)],
            ["hidden / intermediate", f"{hidden} / {inter}"],
            ["vocabulary", cfg.vocab_size],
            ["context (max positions)", getattr(cfg, "max_position_embeddings", "?")],
            ["dtype (as stored)", ", ".join(dtypes)],
            ["weight files", f"{disk.n_files} safetensors, {fmt_bytes(disk.nbytes)}, headers checked"
             if disk.n_files else "none (pickle weights are not inspected)" if any(
                 (path / n).is_file() for n in hub.PICKLE_FILES) else "none"],
            ["compression", ", ".join(t["type"] for t in transforms) or "none"],
        ],
    ))
    console.print(table(
        "memory", ["item", "bytes"],
        [
            ["weights (as stored)", fmt_bytes(w)],
            [f"KV cache per 1k tokens ({kv_dtype}, batch 1)", fmt_bytes(kv1k)],
            [f"KV cache, batch {batch} x context {context}", fmt_bytes(kvc)],
            ["activations, prefill peak (estimate)", fmt_bytes(act)],
            [f"[bold]inference total, batch {batch} x context {context}", f"[bold]{fmt_bytes(est.total)}"],
        ],
    ))


def _logical_parameters(model) -> int:
    """Parameters as the model computes with them: a quantized Linear counts in x out (+ bias), not its codes."""
    total, counted, seen = 0, set(), set()
    for name, mod in model.named_modules():
        if any(name.startswith(c + ".") for c in counted):
            continue
        if hasattr(mod, "in_features") and hasattr(mod, "out_features") and not isinstance(mod, torch.nn.Linear) \
                and any(p.dtype in (torch.int8, torch.uint8, torch.int32) or p.element_size() == 1 for p in mod.parameters(recurse=False)):
            total += mod.in_features * mod.out_features + (mod.bias.numel() if getattr(mod, "bias", None) is not None else 0)
            counted.add(name)
        else:
            for p in mod.parameters(recurse=False):
                if id(p) not in seen:  # tied weights (embeddings / lm_head) once
                    seen.add(id(p))
                    total += p.numel()
    return total


def _heads_summary(model) -> str:
    """``"16 / 4"``, or per-layer counts when pruning left layers uneven."""
    try:
        layouts = [_hf.attention_layout(a) for _, a in _hf.attention_modules(model)]
    except (TypeError, AttributeError):
        return f"{_hf.num_heads(model.config)} / {_hf.num_kv_heads(model.config)}"
    q = [len(lay) for lay in layouts]
    kv = [max(lay) + 1 for lay in layouts]
    if len(set(q)) == 1 and len(set(kv)) == 1:
        return f"{q[0]} / {kv[0]}"
    return f"{sum(q)} / {sum(kv)} in all; per layer q {q}, kv {kv}"


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Shipped model name or local model folder."),
    max_tokens: int = typer.Option(32768, "--max-tokens", min=0, help="Bound the held-out tokens read (0: all)."),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="Window length in tokens."),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    text_file: Path = typer.Option(None, "--text", help="Evaluate on this UTF-8 text file instead of the held-out text."),
    device: Device = "auto",
    dtype: DType = "auto",
    json_out: Path = typer.Option(None, "--json", help="Also write the result to this JSON file."),
    kv_bits: KVBits = None,
    kv_group_size: KVGroupSize = 64,
    kv_residual: KVResidual = "auto",
    kv_share: KVShare = False,
    kv_share_start: KVShareStart = None,
    kv_share_threshold: KVShareThreshold = 0.9,
    kv_share_layers: KVShareLayers = None,
    kv_chunk: int = typer.Option(64, "--kv-chunk", min=1, help="With a KV cache option: tokens fed per forward."),
    tp: TP = 1,
) -> None:
    """Held-out perplexity of a model (bundled Python-docs text unless --text is given).

    With --kv-bits / --kv-share the windows are fed --kv-chunk tokens at a time through the
    compressed cache (chunked prefill + decode), so attention really reads the compressed cache."""
    from ..evaluate import perplexity

    if max_tokens == 1:
        raise ValueError("--max-tokens 1 scores nothing (perplexity needs 2 tokens); give >= 2, or 0 for all")
    check_dtype(dtype)
    check_json_out(json_out)
    text = None
    if text_file is not None:
        text = read_text_file(text_file, "--text")
    kv = _kv_config(kv_bits, kv_group_size, kv_residual, kv_share, kv_share_start, kv_share_threshold, kv_share_layers)
    with _loaded(model, dtype, device, tp) as (m, _, lead):
        tok = hub.load_tokenizer(model)
        kv = kv or _recorded_kv(m)
        if kv is None:
            res = perplexity(m, tok, text, max_tokens=max_tokens or None, seq_len=seq_len, batch_size=batch_size,
                             progress=lead)
        else:
            from ..kv.metrics import cached_perplexity

            res = cached_perplexity(m, tok, text, kv=kv, max_tokens=max_tokens or None, seq_len=seq_len,
                                    chunk=min(kv_chunk, seq_len), batch_size=batch_size, progress=lead)
    if not lead:
        return
    console.print(table(f"{model} on {'held-out text' if text is None else text_file}", ["metric", "value"], [
        ["KV cache", kv.label() if kv else "none (one teacher-forced pass per window)"],
        ["perplexity", f"{res.perplexity:.3f}"],
        ["mean NLL (nats/token)", f"{res.nll:.4f}"],
        ["tokens scored", f"{res.tokens:,}"],
        ["window", res.seq_len],
    ]))
    if json_out:
        extra = {"kv_cache": kv.to_dict()} if kv else {}
        json_out.write_text(json.dumps({"model": model, **res.to_dict(), **extra}, indent=2))


@app.command()
def generate(
    model: str = typer.Argument(..., help="Shipped model name or local model folder."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, max=100000),
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.8, min=1e-4),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    device: Device = "auto",
    dtype: DType = "auto",
    kv_bits: KVBits = None,
    kv_group_size: KVGroupSize = 64,
    kv_residual: KVResidual = "auto",
    kv_share: KVShare = False,
    kv_share_start: KVShareStart = None,
    kv_share_threshold: KVShareThreshold = 0.9,
    kv_share_layers: KVShareLayers = None,
    tp: TP = 1,
) -> None:
    """Continue PROMPT with the model (greedy by default); --kv-bits / --kv-share compress its KV cache."""
    if not prompt:
        raise ValueError("PROMPT is empty; give some text to continue")
    check_dtype(dtype)
    check_finite(temperature, "--temperature", 1e-4)
    check_finite(top_p, "--top-p", 0.0, 1.0)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"--seed {seed} does not fit in 64 bits")
    kv = _kv_config(kv_bits, kv_group_size, kv_residual, kv_share, kv_share_start, kv_share_threshold, kv_share_layers)
    with _loaded(model, dtype, device, tp) as (m, dev, lead), torch.no_grad():
        tok = hub.load_tokenizer(model)
        kv = kv or _recorded_kv(m)
        torch.manual_seed(seed)  # the same seed on every rank: sampled tokens agree
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(dev)
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
        fast_kv = kv is None or (kv.bits is not None and not kv.share)  # the helper keeps quantized caches too
        if fast_kv and tp == 1 and torch.device(dev).type == "cuda" and _fast_generate_ok(m):
            from ..generation.generator import Generator

            res = Generator(m, kv=kv).generate(ids, max_new_tokens, do_sample=sample, temperature=temperature,
                                               top_p=top_p, eos_token_id=tok.eos_token_id)
            out = res.tokens
            console.print(f"[dim]compile {res.compile_s:.1f}s, prefill {res.prefill_s * 1e3:.0f} ms, "
                          f"decode {res.tokens_per_s:.1f} tokens/s[/dim]")
        elif kv is None:
            out = m.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kwargs)
        else:
            from ..generation.kv import generate_with

            out, cache = generate_with(m, ids, kv, max_new_tokens=max_new_tokens, fused=tp == 1,
                                       pad_token_id=tok.pad_token_id, **kwargs)
            logging.getLogger(__name__).info("KV cache %s: %s held for %d tokens%s", kv.label(),
                                             fmt_bytes(cache.nbytes()), int(cache.get_seq_length()),
                                             f" on each of {tp} ranks" if tp > 1 else "")
    if not lead:
        return
    console.print(tok.decode(out[0], skip_special_tokens=True), highlight=False, markup=False)


def _fast_generate_ok(model) -> bool:
    """Whether the compiled static-cache helper (openautoglm.generation.generator) can run this model."""
    from ..generation.generator import Generator

    try:
        Generator(model, compile=False, cuda_graph=False)
    except ValueError as e:
        logging.getLogger(__name__).info("using model.generate: %s", e)
        return False
    return True


@contextlib.contextmanager
def _loaded(model: str, dtype: str, device: str, tp: int):
    """``(model, torch.device, is rank 0)``: the whole model, or this rank's tensor-parallel part under torchrun."""
    from .. import parallel

    if tp == 1 and not parallel.launched_by_torchrun():
        dev = torch.device(pick_device(device))
        yield hub.from_pretrained(model, dtype=dtype, device=dev), dev, True
        return
    with parallel.distributed(None if device == "auto" else device) as dev:
        world = parallel.comm.world_size()
        if world != tp:
            raise ValueError(f"--tp {tp} needs {tp} processes, found {world}: run `torchrun --nproc-per-node {tp} "
                             f"-m openautoglm ... --tp {tp}`")
        lead = parallel.comm.rank() == 0
        if not lead:  # the other ranks stay quiet: errors only
            console.quiet = True
            logging.getLogger().setLevel(logging.ERROR)
        yield parallel.from_pretrained(model, tp_size=tp, dtype=dtype, device=dev), dev, lead


def _recorded_kv(model):
    """The KV cache a compressed model records (``compress --budget``), used when no --kv-* option is given."""
    kv = getattr(model, "kv_cache_config", None)
    if kv is not None:
        logging.getLogger(__name__).info("KV cache %s (recorded in the model's config)", kv.label())
    return kv


def _kv_config(bits, group_size, residual, share, share_start, share_threshold, share_layers=None):
    """The KVCacheConfig the --kv-* options ask for, or None when they ask for no compression."""
    if bits is None and not share and not share_layers:
        return None
    from ..kv import KVCacheConfig

    if residual != "auto":
        try:
            residual = int(residual)
        except ValueError:
            raise ValueError(f"--kv-residual {residual!r} must be an integer >= 0 or 'auto'") from None
    pairs = ()
    if share_layers:
        try:
            pairs = tuple(tuple(int(x) for x in p.split(":")) for p in share_layers.split(","))
        except ValueError:
            raise ValueError(f"--kv-share-layers {share_layers!r} must look like 'SOURCE:LAYER,...', e.g. '3:5,1:4'") from None
    return KVCacheConfig(bits=bits, group_size=group_size, residual_length=residual, share=share,
                         share_start=share_start, share_threshold=share_threshold, share_layers=pairs)
