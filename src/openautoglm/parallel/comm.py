"""torch.distributed glue: join the process group ``torchrun`` describes, pick the tensor-parallel group, and
the two collectives the sharded model calls (PyTorch's functional collectives, which ``torch.compile`` traces).

Nothing here moves bytes by itself: every transfer is a ``torch.distributed`` collective (NCCL on GPUs,
gloo on the CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_MESHES: dict[tuple[int, int], object] = {}
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True in a process started by ``torchrun`` (its rendezvous variables are set)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def rank() -> int:
    """This process's global rank (0 without ``torch.distributed``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(device: str | torch.device | None = None) -> torch.device:
    """Join the process group of a ``torchrun`` launch (once) and return this rank's device.

    ``device``: ``None``/``"auto"`` (this rank's GPU ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU),
    ``"cpu"`` or ``"cuda"``. The backend is NCCL for GPUs and gloo for the CPU. Without ``torchrun`` (a single
    process) nothing is initialized and the device is returned as asked.
    """
    want = "auto" if device is None else str(device)
    if want not in ("auto", "cpu", "cuda") and not want.startswith("cuda:"):
        raise ValueError(f"device={device!r}; accepted: auto, cpu, cuda (each rank uses cuda:LOCAL_RANK)")
    use_cuda = want.startswith("cuda") or (want == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {want!r} requested but CUDA is not available; use device='cpu'")
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(dev)
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return dev
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed")
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, device_id=dev if use_cuda else None)
    log.debug("rank %d/%d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    return dev


@contextlib.contextmanager
def distributed(device: str | torch.device | None = None) -> Iterator[torch.device]:
    """:func:`init_distributed` for a block; the group is destroyed at its end if it was created here."""
    created = launched_by_torchrun() and not (dist.is_available() and dist.is_initialized())
    dev = init_distributed(device)
    try:
        yield dev
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def tp_group(tp_size: int | None, group=None) -> tuple[int, int, object]:
    """``(tp_size, rank in the group, process group)`` for a tensor-parallel degree.

    ``group`` given: its size and this rank's place in it. Otherwise the default group when ``tp_size`` is the
    world size, or the ``"tp"`` dimension of a ``(world / tp, tp)`` DeviceMesh (replicas of a ``tp``-way split).
    Without ``torch.distributed`` only ``tp_size`` 1 is possible (no group, no communication).
    """
    if group is not None:
        return dist.get_world_size(group), dist.get_rank(group), group
    if not (dist.is_available() and dist.is_initialized()):
        tp = tp_size or 1
        if tp > 1:
            raise ValueError(f"tp_size={tp} needs {tp} processes in a torch.distributed group: launch with "
                             f"`torchrun --nproc-per-node {tp} ...` and call openautoglm.parallel.init_distributed()")
        return 1, 0, None
    world = dist.get_world_size()
    tp = tp_size or world
    if tp == world:
        return world, dist.get_rank(), dist.group.WORLD
    if world % tp:
        raise ValueError(f"tp_size={tp} does not divide the world size {world}; use a divisor of {world}")
    key = (world, tp)
    if key not in _MESHES:  # collective: every rank creates the same mesh, in the same order
        from torch.distributed.device_mesh import init_device_mesh

        kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
        _MESHES[key] = init_device_mesh(kind, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    mesh = _MESHES[key]
    return tp, mesh.get_local_rank("tp"), mesh.get_group("tp")


try:  # torch >= 2.12 renamed the gather
    from torch.distributed._functional_collectives import all_gather_single as _gather
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._functional_collectives import all_gather_tensor as _gather


def _functional() -> bool:
    """Use the functional collectives (traceable, autograd-safe) under ``torch.compile`` or with grad enabled; in
    eager inference the in-place c10d calls, which cost several times less per call (no AsyncCollectiveTensor)."""
    return torch.compiler.is_compiling() or torch.is_grad_enabled()


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group`` (same shape on every rank); ``x`` may be summed in place."""
    if _functional():
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(x, "sum", group)
    dist.all_reduce(x, group=group)
    return x


def all_gather_last(x: torch.Tensor, group) -> torch.Tensor:
    """``x: (..., n)`` on each rank -> ``(..., n * ranks)``, the ranks' parts side by side in rank order."""
    x = x.contiguous()
    if _functional():
        return _gather(x, x.dim() - 1, group)
    n = dist.get_world_size(group)
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # the ranks' tensors stacked along dim 0
    # torch 2.12 renamed all_gather_into_tensor to all_gather_single
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)
    return out.reshape(n, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], n * x.shape[-1])
