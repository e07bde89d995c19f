"""Loading: a shipped name or local folder -> a transformers model, rebuilding recorded compression."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .. import _hf
from ..errors import CheckpointError, ModelNotFoundError, OutOfMemoryError, UnsupportedModelError
from ..units import format_bytes
from . import plugins
from .config import _load_config, _resolve_dtype
from .lazy import check_coverage, stream_into
from .names import resolve_model_path
from .reader import CheckpointReader
from .registry import applied_transforms, apply_rebuilders, registered_transforms, unknown_transforms
from .save import _attach
from .validate import weight_files

log = logging.getLogger("openautoglm.hub")

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    found = [n for n in PICKLE_FILES if (path / n).is_file()]
    if not found:
        raise CheckpointError(f"no *.safetensors weights in {path}")
    if not allow_pickle:
        raise CheckpointError(
            f"{path} holds only pickle weights ({', '.join(found)}); pickle files can run code when loaded, so "
            "they are refused -- convert to safetensors, or pass allow_pickle=True to load them with weights_only=True"
        )
    state: dict[str, torch.Tensor] = {}
    files = [path / n for n in found if not n.endswith(".json")]
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if not all(isinstance(n, str) and n and Path(n).name == n and n != ".." for n in names):
                raise ValueError(f"shard names must be plain file names in the folder, got {names[:3]}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"corrupt index file {index}: {e}") from None
        files = [path / n for n in names]
    for f in files:
        try:
            state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise CheckpointError(f"cannot load {f} with weights_only=True: {str(e).splitlines()[0]}") from None
    return state


def build_empty(path: Path, config, torch_dtype: torch.dtype, trust_remote_code: bool, *,
                include_buffers: bool = False) -> nn.Module:
    """The model of ``config`` on the meta device (buffers too with ``include_buffers``), its recorded
    transforms re-applied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM as _HFAuto

    transforms = applied_transforms(config)
    if transforms:
        unknown = unknown_transforms(transforms)
        if unknown:
            raise CheckpointError(f"config.json in {path} records transforms {unknown} that this openautoglm does "
                                  f"not know; known: {registered_transforms()}")
    with init_empty_weights(include_buffers=include_buffers):
        try:
            model = _HFAuto.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError, AssertionError, RuntimeError) as e:
            if is_oom(e):
                raise
            raise CheckpointError(f"cannot build a {config.model_type} model from config.json in {path}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        for t in transforms:
            try:
                apply_rebuilders(model, [t])
            except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as e:
                raise CheckpointError(f"config.json in {path} records a {t.get('type')!r} transform that does not "
                                      f"fit the model: {type(e).__name__}: {e}") from None
    model.tie_weights()  # tied tensors are one object from here on: read (and counted) once
    return model


def open_checkpoint(path: Path, *, dtype=None, trust_remote_code: bool = False, allow_pickle: bool = False,
                    progress=None) -> tuple[nn.Module, CheckpointReader]:
    """The empty (meta) model of folder ``path`` and a reader over its weights; nothing is read yet but the
    safetensors headers (a truncated or corrupt shard is named here)."""
    config = _load_config(path, trust_remote_code)
    torch_dtype = _resolve_dtype(dtype, config)
    files = weight_files(path)
    if files:
        reader = CheckpointReader(files)
    else:
        reader = CheckpointReader.from_state_dict(_load_pickle(path, allow_pickle))
    reader.progress = default_progress(reader.total_bytes) if progress is None else (progress or None)
    return build_empty(path, config, torch_dtype, trust_remote_code), reader


def place_buffers(model: nn.Module, device: torch.device) -> None:
    """Rebuild the non-persistent rotary buffers and move the other real buffers to ``device``."""
    from accelerate.utils import set_module_tensor_to_device

    _hf.rebuild_rotary_buffers(model, device)
    for name, b in list(model.named_buffers()):
        if not b.is_meta and b.device != device:
            set_module_tensor_to_device(model, name, device, value=b, clear_cache=False)


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    quantization=None,
    bits: int | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress=None,
) -> nn.Module:
    """Load a causal LM lazily, rebuilding any openautoglm compression it records, optionally quantizing on load.

    The model is built on the meta device and each tensor is read from the memory-mapped safetensors shards
    only when it is assigned, straight onto ``device`` in its final dtype: ``device="cuda"`` never holds the
    model on the host. With ``quantization`` (or ``bits``) each selected Linear is quantized as soon as its
    weight arrives and only the packed result is kept.

    Parameters
    ----------
    name_or_path : a shipped model name (see :func:`shipped_models`), a local folder, or a Hub id ``org/name``
        (from the Hugging Face cache, downloaded there when online and ``HF_HUB_OFFLINE`` is not set).
    dtype : floating dtype of the non-quantized weights; default: the checkpoint's own.
    device : where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``); default CPU.
    quantization : a :class:`~openautoglm.quant.QuantConfig` to quantize with while loading (``scheme="static"``
        calibrates layer by layer on the bundled held-out text, with the model's own tokenizer).
    bits : short form of ``quantization``: 8 (w8a8; int8 or fp8, whichever is faster on ``device``) or 4 (w4 g128).
    trust_remote_code : allow custom modelling code shipped in the folder (off by default).
    allow_pickle : accept ``pytorch_model.bin`` (loaded with ``weights_only=True``) when no safetensors exist.
    revision, cache_dir : Hub ids only: branch/tag/commit, and the Hugging Face cache folder.
    progress : ``None`` (a tqdm bar for checkpoints of 1 GiB or more), ``False``, or ``fn(shard, done, total)``.
    """
    path = resolve_model_path(name_or_path, revision=revision, cache_dir=cache_dir, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code)
    try:
        device = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; accepted: cpu, cuda, cuda:N, mps") from None
    with oom_guard(path, sum(f.stat().st_size for f in path.glob("*.safetensors") if f.is_file())):
        model, reader = open_checkpoint(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                        allow_pickle=allow_pickle, progress=progress)
        return _fill(model, reader, path, device, quantization, bits)


_OOM_TEXT = ("can't allocate memory", "cannot allocate memory", "out of memory", "os error 12", "std::bad_alloc",
             "can't start new thread")  # (a thread stack is address space too)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(t in str(e).lower() for t in _OOM_TEXT)


@contextlib.contextmanager
def oom_guard(path: Path, nbytes: int):
    """Running out of host memory while loading is an :class:`OutOfMemoryError` that says how much the
    checkpoint needs, not an allocator traceback from inside torch or safetensors."""
    try:
        yield
    except OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch/safetensors report allocation failures as RuntimeError/own types
        if not is_oom(e):
            raise
        raise OutOfMemoryError(f"not enough memory to load {path}: its tensors take {format_bytes(nbytes)} as stored "
                               "(more while converting dtypes); free memory, load with dtype='bf16', or use a "
                               "machine with more RAM") from None


def _fill(model: nn.Module, reader: CheckpointReader, path: Path, device: torch.device, quantization, bits):
    hook = None
    if quantization is not None or bits is not None:
        hook = plugins.quantize_on_load(model, quantization, bits, device=device, source=path)
    check_coverage(model, reader, hook, path)
    place_buffers(model, device)
    unused = stream_into(model, reader, device, hook=hook)
    if unused:
        log.warning("ignored %d tensors not used by the model: %s", len(unused), unused[:5])
    model.tie_weights()
    still_meta = sorted({n for n, p in model.named_parameters() if p.is_meta})
    if still_meta:  # check_coverage makes this unreachable unless a rebuilder and its checkpoint disagree
        raise CheckpointError(f"{path} lacks tensors the model needs: {', '.join(still_meta[:5])}")
    model.eval()
    model = model.to(device)  # no copies: everything is there already; re-runs device hooks of quantized modules
    model.name_or_path = str(path)
    _attach(model, path)
    plugins.model_ready(model)  # model.generate(cache_implementation="static") -> the compiled decode
    return model


def default_progress(total: int, threshold: int = 2**30):
    """A tqdm bar over the bytes read (shard name in its description) for checkpoints of ``threshold`` or more."""
    if total < threshold:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading", leave=False)
    seen: dict[str, int] = {}

    def update(shard: str, done: int, shard_total: int) -> None:
        bar.set_description(shard, refresh=False)
        bar.update(done - seen.get(shard, 0))
        seen[shard] = done
        if bar.n >= total:
            bar.close()

    return update


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_tokenizer(name_or_path: str | os.PathLike, *, revision: str | None = None,
                   cache_dir: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """The tokenizer saved with a shipped model, in a local folder or with a Hub model.

    Custom tokenizer code named by ``tokenizer_config.json`` (``auto_map``) is not run unless
    ``trust_remote_code=True``; a broken tokenizer file is a :class:`CheckpointError` naming it."""
    from transformers import AutoTokenizer as _HFTok

    path = resolve_model_path(name_or_path, revision=revision, cache_dir=cache_dir)
    if not has_tokenizer(path):
        raise ModelNotFoundError(f"folder {path} has no tokenizer files (tokenizer.json)")
    f = path / "tokenizer_config.json"
    if f.is_file():
        try:
            cfg = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"broken tokenizer file {f}: {e}") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"broken tokenizer file {f}: a JSON {type(cfg).__name__}, not an object")
    try:
        return _HFTok.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - tokenizers/transformers raise bare Exception on a broken file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "custom code" in first:
            raise UnsupportedModelError(f"{f} asks for custom tokenizer code (auto_map); it is not run unless you "
                                        "pass trust_remote_code=True after reading that code") from None
        raise CheckpointError(f"cannot load the tokenizer in {path} (tokenizer.json / tokenizer_config.json): "
                              f"{first}") from None


class AutoModelForCausalLM:
    """``openautoglm.AutoModelForCausalLM.from_pretrained(name_or_path, ...)``: see :func:`from_pretrained`."""

    from_pretrained = staticmethod(from_pretrained)

    def __init__(self, *args, **kwargs):
        raise TypeError("use AutoModelForCausalLM.from_pretrained(name_or_path)")


class AutoTokenizer:
    """``openautoglm.AutoTokenizer.from_pretrained(name_or_path)``: see :func:`load_tokenizer`."""

    from_pretrained = staticmethod(load_tokenizer)

    def __init__(self, *args, **kwargs):
        raise TypeError("use AutoTokenizer.from_pretrained(name_or_path)")


def empty_model(name_or_path: str | os.PathLike, *, dtype=None, trust_remote_code: bool = False) -> nn.Module:
    """The model of a folder built on the meta device, with its recorded transforms applied; no weights read.

    Parameter shapes and dtypes are exact (quantized and pruned layers included), so byte counts
    taken from it equal those of the loaded model.
    """
    path = resolve_model_path(name_or_path, trust_remote_code=trust_remote_code)
    config = _load_config(path, trust_remote_code)
    return build_empty(path, config, _resolve_dtype(dtype, config), trust_remote_code, include_buffers=True)
