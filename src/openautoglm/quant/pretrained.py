"""``quantize_pretrained(src, out, ...)``: checkpoint in, quantized checkpoint out, one layer in memory at a time.

The streaming form of ``from_pretrained`` + ``quantize`` + ``save_pretrained`` (what ``openautoglm compress``
runs): shards are read tensor by tensor, each Linear is quantized on ``device`` as its weight arrives
(:class:`~openautoglm.quant.onload.QuantizeOnLoad`), and each finished decoder layer is written to the output
shards and freed (:class:`~openautoglm.hub.writer.StreamingWriter`). The output goes into a temporary folder
renamed into place at the end: an interrupted run leaves no partial output and any previous one intact. The
packed tensors equal those of the in-memory path.
"""

from __future__ import annotations

import logging
import os
import re
import time

import torch

from .._util.atomic import atomic_directory
from ..hub.lazy import check_coverage, stream_into
from ..hub.load import oom_guard, open_checkpoint, place_buffers
from ..hub.names import resolve_model_path
from ..hub.save import check_output_dir, copy_tokenizer, write_config
from ..hub.writer import StreamingWriter
from .config import QuantConfig
from .onload import QuantizeOnLoad

log = logging.getLogger(__name__)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _size(v: str | int) -> int:
    """Bytes of ``v``: a positive int, or a size string as transformers takes it (``"2GB"``, ``"500MiB"``)."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", v) if isinstance(v, str) else None
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size={v!r}: write a positive number of bytes or a size such as '2GB', '500MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def quantize_pretrained(
    name_or_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    quantization: QuantConfig | None = None,
    *,
    bits: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer=None,
    calib_text: str | None = None,
    max_shard_size: str | int = "2GB",
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress=None,
    overwrite: bool = False,
):
    """Quantize the checkpoint ``name_or_path`` into ``out_dir`` without holding the model in memory.

    Parameters
    ----------
    name_or_path : shipped name, local folder or Hub id (see :func:`openautoglm.from_pretrained`).
    out_dir : output folder, written atomically; an existing model folder is replaced only with ``overwrite=True``.
    quantization, bits : a :class:`QuantConfig`, or the short form ``bits=8`` / ``bits=4``.
    device : where weights are quantized (``"cpu"``, ``"cuda"``, ...); default CPU.
    dtype : dtype of the weights left in float (default: the checkpoint's).
    tokenizer, calib_text : ``scheme="static"``: tokenizer (default: the source's) and calibration text
        (default: the bundled held-out text). Tokenizer files of the source are copied when present.
    max_shard_size : tensor bytes per output shard.
    progress : ``fn(shard, bytes done, shard bytes)`` called as the source is read, or ``None``/``False``.

    Returns
    -------
    QuantResult : what was quantized and skipped, bytes before/after; ``.path`` is the output folder and
    ``.seconds`` the wall time.
    """

    t0 = time.perf_counter()
    shard_bytes = _size(max_shard_size)
    out = check_output_dir(out_dir, overwrite=overwrite)
    path = resolve_model_path(name_or_path, revision=revision, cache_dir=cache_dir,
                              trust_remote_code=trust_remote_code)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with oom_guard(path, sum(f.stat().st_size for f in path.glob("*.safetensors") if f.is_file())):
        return _run(path, out, quantization, bits, device, dtype, tokenizer, calib_text, shard_bytes,
                    trust_remote_code, progress, t0)


def _run(path, out, quantization, bits, device, dtype, tokenizer, calib_text, shard_bytes, trust_remote_code,
         progress, t0):

    model, reader = open_checkpoint(path, dtype=dtype, trust_remote_code=trust_remote_code, progress=progress or False)
    hook = QuantizeOnLoad.for_model(model, quantization, bits, device=device, source=path, tokenizer=tokenizer,
                                    calib_text=calib_text)
    check_coverage(model, reader, hook, path)
    place_buffers(model, device)
    with atomic_directory(out) as tmp:
        writer = StreamingWriter(tmp, model, shard_bytes)
        try:
            unused = stream_into(model, reader, device, hook=hook, sink=writer)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        if unused:
            log.warning("ignored %d tensors not used by the model: %s", len(unused), unused[:5])
        write_config(model, tmp)
        copy_tokenizer(tmp, tokenizer=tokenizer, source=path)
    result = model.quant_result
    result.path, result.seconds = out, time.perf_counter() - t0
    log.info("wrote %s (%s) in %.1f s", out, result.config.scheme, result.seconds)
    return result
