"""Measured memory: ``with MemoryProfiler(model=..., optimizer=...) as prof: ...``.

* On CUDA the peak is ``torch.cuda.max_memory_allocated`` (reset on entry; the CUDA context and the
  allocator's cached-but-free blocks are not in it), reported absolute and above the bytes allocated on entry.
* On CPU two measurements: the peak process RSS (sampled every 5 ms) and, with ``track_tensors=True``
  (default on CPU), the exact peak of live tensor storage bytes, seen through a ``TorchDispatchMode``
  (tensors alive on entry are counted once, from the model/optimizer given).
* ``per_module=True`` records, for each module's forward, the peak bytes reached inside it.

``prof.breakdown()`` returns the measured figures in the estimator's term names (weights, gradients,
optimizer_states, and the rest of the peak as ``activations+workspace``) so the two print side by side.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorTracker(TorchDispatchMode):
    """Live tensor-storage bytes created by aten ops while active, and their peak (any device).

    With ``explain=True`` it also keeps, at the peak, what was alive: ``at_peak`` lists
    ``(bytes, shape, dtype, op that made it)`` and ``peak_op`` names the op that reached the peak.
    """

    def __init__(self, ignore: list[torch.Tensor] = (), explain: bool = False):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.explain = explain
        self.at_peak: list[tuple[int, tuple[int, ...], str, str]] = []
        self.peak_op = ""
        self._info: dict[int, tuple[int, tuple[int, ...], str, str]] = {}
        self._refs: dict[int, object] = {t.untyped_storage().data_ptr(): None for t in ignore}

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._refs.pop(key, None)
        self._info.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if n == 0 or key in self._refs:
                continue
            self.live += n
            self._refs[key] = weakref.ref(st, lambda _r, k=key, n=n: self._free(k, n))
            if self.explain:
                self._info[key] = (n, tuple(t.shape), str(t.dtype).replace("torch.", ""), str(func.overloadpacket))
            if self.live > self.peak:
                self.peak = self.live
                if self.explain:
                    self.at_peak, self.peak_op = list(self._info.values()), str(func.overloadpacket)
        return out

    def peak_summary(self, top: int = 12) -> list[dict]:
        """The tensors alive at the peak (``explain=True``), grouped by (shape, dtype, op), largest first."""
        groups: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
        for n, shape, dtype, op in self.at_peak:
            g = groups[(shape, dtype, op)]
            g[0] += n
            g[1] += 1
        rows = [{"bytes": b, "count": c, "shape": list(k[0]), "dtype": k[1], "op": k[2]} for k, (b, c) in groups.items()]
        return sorted(rows, key=lambda r: -r["bytes"])[:top]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _tensor_bytes(ts) -> int:
    seen, total = set(), 0
    for t in ts:
        if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


class MemoryProfiler:
    """Measure the peak memory of the code in the ``with`` block (see module docstring).

    Parameters
    ----------
    device : ``"cuda"``, ``"cuda:N"``, ``"cpu"`` or None (the model's device, else CUDA when available).
    model, optimizer : optional; their parameters, gradients and states are reported as separate terms.
    per_module : record the peak inside each module's forward (``prof.module_peaks``).
    track_tensors : on CPU, count live tensor bytes exactly (default True on CPU).
    """

    def __init__(self, device=None, model: nn.Module | None = None, optimizer=None, per_module: bool = False,
                 track_tensors: bool | None = None):
        if device is None:
            p = next(model.parameters(), None) if model is not None else None
            device = p.device if p is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        self.model, self.optimizer, self.per_module = model, optimizer, per_module
        self.track = (self.device.type == "cpu") if track_tensors is None else track_tensors
        self.start_bytes = self.peak_bytes = 0
        self.peak_rss = self.start_rss = 0
        self.module_peaks: dict[str, int] = defaultdict(int)
        self._hooks: list = []
        self._tracker: TensorTracker | None = None
        self._stop = threading.Event()
        self._global = 0

    # ------------------------------------------------------------------ context
    def _now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._base + (self._tracker.live if self._tracker else 0)

    def _peak_now(self) -> int:
        if self.device.type == "cuda":
            return max(self._global, torch.cuda.max_memory_allocated(self.device))
        return self._base + (self._tracker.peak if self._tracker else 0)

    def __enter__(self) -> MemoryProfiler:
        existing = []
        if self.model is not None:
            existing += list(self.model.parameters()) + list(self.model.buffers())
            existing += [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.optimizer is not None:
            existing += [t for st in self.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        self._base = _tensor_bytes(existing)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.track:
            self._tracker = TensorTracker(ignore=existing)
            self._tracker.__enter__()
        self.start_bytes = self._now()
        self.start_rss = self.peak_rss = _rss()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        if self.per_module and self.model is not None:
            self._install_hooks()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.peak_bytes = self._peak_now()
        finally:
            if self._tracker is not None:
                self._tracker.__exit__(None, None, None)
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            self._stop.set()
            self._sampler.join()
            self.peak_rss = max(self.peak_rss, _rss())

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_rss = max(self.peak_rss, _rss())

    def _install_hooks(self) -> None:
        starts: dict[str, int] = {}

        def pre(name):
            def fn(_m, _a):
                if self.device.type == "cuda":  # per-module peak; the global peak so far is kept in _global
                    self._global = self._peak_now()
                    torch.cuda.reset_peak_memory_stats(self.device)
                starts[name] = self._now()
            return fn

        def post(name):
            def fn(_m, _a, _o):
                peak = self._peak_now()
                self.module_peaks[name] = max(self.module_peaks[name], peak)
                self.peak_bytes = max(self.peak_bytes, peak)
            return fn

        for name, mod in self.model.named_modules():
            if name:
                self._hooks.append(mod.register_forward_pre_hook(pre(name)))
                self._hooks.append(mod.register_forward_hook(post(name)))

    # ------------------------------------------------------------------ results
    def breakdown(self) -> dict[str, int]:
        """Measured terms in the estimator's names: weights, gradients, optimizer_states, the rest, total."""
        out: dict[str, int] = {"total": int(self.peak_bytes)}
        if self.model is not None:
            out["weights"] = _tensor_bytes(list(self.model.parameters()) + list(self.model.buffers()))
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                out["gradients"] = _tensor_bytes(grads)
        if self.optimizer is not None:
            out["optimizer_states"] = _tensor_bytes(
                [t for st in self.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)])
        out["activations+workspace"] = out["total"] - sum(v for k, v in out.items() if k != "total")
        return out
