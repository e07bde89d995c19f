"""NaN/Inf guards for the compression verbs: name the layer and tensor, never compress garbage silently.

* :func:`check_weights` -- before a verb touches a model: every target module's weight (and bias) is finite.
* :class:`InputWatch` -- in calibration hooks: the activation a module receives is finite; when it is not,
  :func:`locate` re-runs the batch with a hook on every module and names where the NaN/Inf first appears
  (the first module, in execution order, whose output is not finite, and which of its parameters are not).
* :func:`check_loss` -- a calibration loss (Taylor/Fisher importance) is finite, with the same location.

All raise :class:`NonFiniteError` (a ``ValueError``) before the model is modified.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import OpenAutoGLMError


class NonFiniteError(OpenAutoGLMError, ValueError):
    """A weight, an activation or a loss holds NaN or Inf values; the message names the layer and tensor."""


def _bad(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


def check_weights(modules: dict[str, nn.Module] | Iterable[tuple[str, nn.Module]], what: str) -> None:
    """Raise naming ``<module>.<tensor>`` when a target's own parameters hold NaN/Inf (``what``: the verb)."""
    items = modules.items() if isinstance(modules, dict) else modules
    for name, mod in items:
        for pname, p in mod.named_parameters(recurse=False):
            n = _bad(p.detach())
            if n:
                raise NonFiniteError(f"{what}: {name}.{pname} holds {n} NaN/Inf values of {p.numel()}; the model "
                                     "is not modified -- fix or reload the checkpoint")


class InputWatch:
    """Records the first calibration input that holds NaN/Inf (called from forward hooks, which must not raise
    mid-forward); :meth:`raise_if_bad` raises after the hooks are removed, naming where the values first appear.

    >>> watch = InputWatch("wanda")                          # doctest: +SKIP
    >>> hook: watch.see(name, x)  ...  loop: if watch.bad: break  ...  finally: remove hooks
    >>> watch.raise_if_bad(model, batch)                     # doctest: +SKIP
    """

    def __init__(self, what: str) -> None:
        self.what, self.first = what, None

    def see(self, name: str, x: torch.Tensor) -> None:
        if self.first is None:
            n = _bad(x.detach())
            if n:
                self.first = (name, n, x.numel())

    @property
    def bad(self) -> bool:
        return self.first is not None

    def raise_if_bad(self, model: nn.Module, batch: torch.Tensor | None) -> None:
        if self.first is None:
            return
        name, n, total = self.first
        origin = locate(model, batch) if batch is not None else None
        raise NonFiniteError(f"{self.what}: the input of {name} holds {n} NaN/Inf values of {total}"
                             + (f"; they first appear in {origin}" if origin else "") + "; the model is not modified")


def check_loss(loss: torch.Tensor, what: str, model: nn.Module, batch) -> None:
    if not torch.isfinite(loss.detach()).all():
        origin = locate(model, batch)
        raise NonFiniteError(f"{what}: the calibration loss is {float(loss.detach()):g}"
                             + (f"; NaN/Inf first appear in {origin}" if origin else "")
                             + "; the model is not modified")


@torch.no_grad()
def locate(model: nn.Module, batch: torch.Tensor) -> str | None:
    """``"the output of <module> (its weight holds 3 NaN/Inf)"`` for the first module whose output is not
    finite when ``model`` runs ``batch``; None when the forward is finite."""
    found: list[str] = []

    def hook(name):
        def fn(mod, args, out):
            if found:
                return
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor) and _bad(t):
                bad_params = [f"its {p} holds {_bad(v.detach())} NaN/Inf" for p, v in mod.named_parameters(recurse=False)
                              if _bad(v.detach())]
                found.append(f"the output of {name}" + (f" ({'; '.join(bad_params)})" if bad_params else ""))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(input_ids=batch, use_cache=False)
    except Exception:  # noqa: BLE001 - the diagnosis must not hide the original problem
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
