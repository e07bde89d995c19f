"""Sharded loading: each rank builds the empty model, cuts it to its part, and reads only its slices.

The model is built on the meta device with the checkpoint's recorded transforms (quantized layers, pruned
heads, low-rank factors: :func:`openautoglm.hub.empty_model`), cut by the rank's :class:`~.plan.ShardPlan`, and
filled from the safetensors files through ``safe_open(...).get_slice`` (:func:`read_rank_state`), which reads
only the bytes of this rank's rows or columns. No rank ever holds another rank's part of a sharded tensor, nor
a full-precision copy of a quantized one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import _hf, hub
from ..errors import CheckpointError
from . import comm
from .config import ShardConfig
from .plan import ShardPlan, make_plan
from .shard import _refuse_save, apply_plan, install
from .slicing import DROP, read_slice

log = logging.getLogger(__name__)


def read_rank_state(files: list[Path], expected: dict[str, torch.Tensor], plan: ShardPlan) -> tuple[dict, dict]:
    """This rank's tensors from safetensors ``files``: ``(state dict, stats)``.

    ``expected`` is the cut model's ``state_dict()`` (meta tensors: names, dtypes, local shapes). Floating tensors
    are cast to the expected dtype; a tensor whose slice does not have the expected shape is a ``CheckpointError``.
    ``stats``: ``bytes_read`` (what this rank read) and ``checkpoint_bytes`` (all tensors the model uses).
    """
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    read = total = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for key in h.keys():
                    if key not in expected:
                        unexpected.append(key)
                        continue
                    view = h.get_slice(key)
                    n = 1
                    for d in view.get_shape():
                        n *= d
                    total += n * expected[key].element_size()
                    sl = plan.tensors.get(key)
                    if sl is DROP:
                        continue
                    t = read_slice(h, key, sl)
                    if tuple(t.shape) != tuple(expected[key].shape):
                        raise CheckpointError(
                            f"{f.name}: tensor {key} has shape {tuple(view.get_shape())}; its slice {tuple(t.shape)} "
                            f"does not match the model's {tuple(expected[key].shape)}")
                    read += t.numel() * t.element_size()
                    if t.is_floating_point() and expected[key].is_floating_point():
                        t = t.to(expected[key].dtype)
                    state[key] = t
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {f}: {e}") from None
    if unexpected:
        log.warning("ignored %d tensors not used by the model: %s", len(unexpected), unexpected[:5])
    return state, {"bytes_read": read, "checkpoint_bytes": total}


def from_pretrained(
    name_or_path: str | os.PathLike,
    tp_size: int | None = None,
    config: ShardConfig | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    group=None,
) -> nn.Module:
    """Load this rank's tensor-parallel part of a model (shipped name or local folder of safetensors).

    Parameters
    ----------
    name_or_path : as :func:`openautoglm.from_pretrained` (compressed checkpoints rebuild their recorded transforms).
    tp_size, config, group : as :func:`~.shard.shard`.
    dtype : floating dtype of the non-quantized weights; default: the checkpoint's own.
    device : where this rank's part goes (``"cuda:LOCAL_RANK"`` from :func:`~.comm.init_distributed`); default CPU.

    The result equals ``shard(openautoglm.from_pretrained(...))`` but never holds more than this rank's part; its
    plan is ``model.shard_plan`` and ``model.shard_load_stats`` says how many bytes this rank read.
    """
    config = ShardConfig.resolve(tp_size, config)
    path = hub.resolve_model_path(name_or_path)
    files = hub.weight_files(path)
    if not files:
        raise CheckpointError(f"{path} has no safetensors weights; sharded loading reads safetensors only")
    for f in files:
        hub.validate_safetensors(f)
    model = hub.empty_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    want = config.tp_size or (comm.world_size() if group is None else dist.get_world_size(group))
    make_plan(model, want, 0, config)  # the plan's errors come before any group is needed
    tp, rank, group = comm.tp_group(want, group)
    plan = make_plan(model, tp, rank, ShardConfig.resolve(tp, config))
    apply_plan(model, plan)
    expected = model.state_dict()
    state, stats = read_rank_state(files, expected, plan)
    model.load_state_dict(state, strict=False, assign=True)
    if plan.tied:
        model.get_submodule(plan.lm_head).weight = model.get_submodule(plan.embedding).weight
    missing = sorted({n for n, p in model.named_parameters() if p.is_meta})
    if missing:
        raise CheckpointError(f"{path} lacks tensors the model needs: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
    _hf.rebuild_rotary_buffers(model, "cpu")
    model.eval()
    model = model.to(torch.device(device) if device is not None else torch.device("cpu"))
    install(model, plan, group)
    model.name_or_path = str(path)
    model.save_pretrained = _refuse_save
    model.shard_load_stats = stats
    log.info("rank %d/%d: read %.1f MiB of %.1f MiB%s", rank, tp, stats["bytes_read"] / 2**20,
             stats["checkpoint_bytes"] / 2**20, "".join(f"; {n}" for n in plan.notes))
    return model
