"""Reading a checkpoint one tensor at a time: memory-mapped safetensors shards (``safe_open``).

:class:`CheckpointReader` indexes every tensor of every shard from the headers (checked first by
:func:`validate_safetensors`, so a truncated shard is named before anything is read) and hands out one
tensor at a time as a zero-copy view of the memory-mapped file. Pages of a mapping that have been read stay
resident (and count in the process RSS) while the mapping is open, so a shard is re-opened after every
``remap_bytes`` read: the host then holds about one tensor, not one shard, whatever the shard size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import CheckpointError
from .validate import validate_safetensors

# safetensors dtype names -> torch dtypes (the ones a transformers checkpoint can hold)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
REMAP_BYTES = 256 * 2**20
PREFETCH_SLOT_BYTES = 64 * 2**20
PREFETCH_SLOTS = 8
PREFETCH_WORKERS = 4
Progress = Callable[[str, int, int], None]  # (shard file name, bytes read from it so far, its data bytes)


class CheckpointReader:
    """Tensor name -> tensor, read lazily from safetensors shards (or from a pickle state dict).

    Parameters
    ----------
    files : the ``*.safetensors`` shards of one checkpoint.
    progress : called after each tensor with ``(shard name, bytes read from it, its data bytes)``.
    remap_bytes : re-open a shard after this many bytes were read from it (bounds resident mapped pages).
    """

    def __init__(self, files: Iterable[Path], *, progress: Progress | None = None,
                 remap_bytes: int = REMAP_BYTES) -> None:
        self.files = [Path(f) for f in files]
        self.progress, self.remap_bytes = progress, remap_bytes
        self._where: dict[str, tuple[Path, int, int]] = {}  # name -> (file, start offset, nbytes)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.shard_bytes: dict[Path, int] = {}
        for f in self.files:
            header = validate_safetensors(f)
            total = 0
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in ST_DTYPES:
                    raise CheckpointError(f"{f} holds tensor {name!r} of dtype {info['dtype']}, which torch cannot load")
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} appears in both {self._where[name][0].name} and {f.name}")
                start, end = info["data_offsets"]
                self._where[name] = (f, start, end - start)
                self._meta[name] = (tuple(info["shape"]), ST_DTYPES[info["dtype"]])
                total += end - start
            self.shard_bytes[f] = total
        self._state: dict[str, torch.Tensor] | None = None
        self._open: tuple[Path, object] | None = None
        self._since_open = 0
        self._done: dict[Path, int] = {f: 0 for f in self.files}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "CheckpointReader":
        """A reader over an already loaded (e.g. ``torch.load(mmap=True)``) state dict."""
        self = cls([])
        self._state = state
        self._meta = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        return self

    def keys(self) -> list[str]:
        """Tensor names in file order (shard, then offset), the order that reads the disk sequentially."""
        if self._state is not None:
            return list(self._state)
        return sorted(self._where, key=lambda k: (self.files.index(self._where[k][0]), self._where[k][1]))

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def source(self, name: str) -> str:
        return self._where[name][0].name if name in self._where else "state dict"

    @property
    def total_bytes(self) -> int:
        return sum(self.shard_bytes.values())

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on the CPU (a view of the mapped file for safetensors: copy it before keeping it)."""
        t = self._read(name)
        self._report(name)
        return t

    def stream(self, names: list[str], device: torch.device, *, prefetch: bool | None = None,
               slot_bytes: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for ``names`` in order: CPU views, or on CUDA tensors already on ``device``.

        With ``prefetch`` (default: on CUDA) worker threads read ahead into a ring of pinned buffers and the
        copies to the GPU are asynchronous, so reading the next tensors from the mapped file overlaps with the
        caller's GPU work on the current one (see :class:`_Prefetcher`).
        """
        if prefetch is None:
            prefetch = device.type == "cuda"
        if not prefetch or self._state is not None or not names:
            for name in names:
                yield name, self.get(name)
            return
        yield from _Prefetcher(self, names, device, slot_bytes or PREFETCH_SLOT_BYTES)

    def _read(self, name: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[name]
        f, _, nbytes = self._where[name]
        handle = self._handle(f)
        try:
            t = handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error type
            raise CheckpointError(f"cannot read tensor {name!r} from {f}: {e}") from None
        self._since_open += nbytes
        return t

    def nbytes(self, name: str) -> int:
        shape, dtype = self._meta[name]
        return torch.Size(shape).numel() * dtype.itemsize

    def _report(self, name: str) -> None:
        if name not in self._where:
            return
        f = self._where[name][0]
        self._done[f] += self._where[name][2]
        if self.progress:
            self.progress(f.name, self._done[f], self.shard_bytes[f])

    def _handle(self, f: Path):
        from safetensors import safe_open

        if self._open is not None and (self._open[0] != f or self._since_open >= self.remap_bytes):
            self.close()
        if self._open is None:
            try:
                self._open = (f, safe_open(str(f), framework="pt", device="cpu"))
            except Exception as e:
                if "Cannot allocate memory" in str(e):  # ENOMEM from mmap: the file is fine, the process is full
                    raise MemoryError(f"not enough memory (address space) to map {f}: {e}") from None
                raise CheckpointError(f"cannot open safetensors file {f}: {e}") from None
            self._since_open = 0
        return self._open[1]

    def close(self) -> None:
        """Unmap the open shard (tensors already handed out keep their own mapping alive)."""
        self._open = None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



class _Prefetcher:
    """Iterator behind :meth:`CheckpointReader.stream` with ``prefetch``.

    Tensors are cut into pieces of at most ``slot_bytes``; worker threads copy the pieces, in order and a few
    ahead, from the mapped file into a ring of pinned buffers (the page faults and memory copies happen off
    the main thread, several at once, as transformers' loader does with its 4 threads); the main thread
    issues the asynchronous host-to-device copy of each piece into its tensor's place on the GPU and recycles
    a buffer once its copy has finished. Pinned host memory: ``slots x slot_bytes``, whatever the tensors.
    """

    def __init__(self, reader: CheckpointReader, names: list[str], device: torch.device,
                 slot_bytes: int = PREFETCH_SLOT_BYTES, slots: int = PREFETCH_SLOTS, workers: int = PREFETCH_WORKERS):
        self.reader, self.names, self.device = reader, names, device
        self.size = max(1, min(slot_bytes, max(reader.nbytes(n) for n in names)))
        self.cuda = device.type == "cuda"
        self.slots = [torch.empty(self.size, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(slots)]
        self.workers = workers

    def _pieces(self):
        for name in self.names:
            view = self.reader._read(name)
            flat = view.reshape(-1).view(torch.uint8)
            total = flat.numel()
            for start in range(0, max(total, 1), self.size):
                n = min(self.size, total - start)
                yield name, flat, start, n, total, view.shape, view.dtype

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, start: int, n: int) -> None:
        dst[:n].copy_(src[start:start + n])

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        free = list(range(len(self.slots)))
        pending: deque = deque()  # (future, slot, piece) being copied into pinned memory
        in_flight: deque = deque()  # (event, slot) host-to-device copies issued

        def release(block: bool) -> None:
            while in_flight and (block or in_flight[0][0].query()):
                ev, s = in_flight.popleft()
                ev.synchronize()
                free.append(s)
                block = False

        pieces = self._pieces()
        exhausted = False
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="openautoglm-read") as pool:
                while True:
                    release(block=False)
                    if not free and not pending:
                        release(block=True)
                    while free and not exhausted:
                        piece = next(pieces, None)
                        if piece is None:
                            exhausted = True
                            break
                        slot = free.pop()
                        pending.append((pool.submit(self._copy, self.slots[slot], piece[1], piece[2], piece[3]), slot, piece))
                    if not pending:
                        break
                    fut, slot, (name, _, start, n, total, shape, dtype) = pending.popleft()
                    fut.result()
                    if start == 0:
                        dev = torch.empty(total, dtype=torch.uint8, device=self.device)
                    dev[start:start + n].copy_(self.slots[slot][:n], non_blocking=self.cuda)
                    if self.cuda:
                        done = torch.cuda.Event()
                        done.record()
                        in_flight.append((done, slot))
                    else:  # a CPU copy is finished already
                        free.append(slot)
                    if start + n >= total:
                        self.reader._report(name)
                        yield name, dev.view(dtype).reshape(shape)
        finally:  # also on an early close: the pool has joined; let the last copies finish
            while in_flight:
                release(block=True)
