"""The sockets through which the capabilities above the hub take part in loading.

The hub reads and writes checkpoints; the capabilities that transform models (quant, prune, kv, generation,
auto) sit above it in the import layers, so the hub never imports them. They plug in here, wired once by the
package root (``openautoglm/__init__.py``, the composition root) with callables that import them on first use:

* **rebuilder providers** -- import the capabilities whose ``register_rebuilder`` calls fill the transform
  registry; run the first time a checkpoint records a transform (:func:`load_rebuilders`);
* **quantize on load** -- the load hook of ``from_pretrained(quantization=..., bits=...)``
  (:func:`quantize_on_load`, provided by :mod:`openautoglm.quant.onload`);
* **model-ready callbacks** -- run on each model ``from_pretrained`` returns and each model ``quantize``
  transforms (:func:`model_ready`; ``model.generate`` routing to the compiled decode).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_providers: list[Callable[[], None]] = []
_providers_run = False
_onload: Callable | None = None
_ready: list[Callable[[nn.Module], None]] = []


def add_rebuilder_provider(fn: Callable[[], None]) -> None:
    """``fn()`` imports capabilities that register transform rebuilders; run once, when first needed."""
    global _providers_run
    _providers.append(fn)
    _providers_run = False


def load_rebuilders() -> None:
    """Run the rebuilder providers (once): every transform this build knows is registered afterwards."""
    global _providers_run
    if not _providers_run:
        for fn in list(_providers):
            fn()
        _providers_run = True


def set_quantize_on_load(factory: Callable) -> None:
    """``factory(model, quantization, bits, *, device, source)`` -> a :class:`~.lazy.LoadHook`."""
    global _onload
    _onload = factory


def quantize_on_load(model: nn.Module, quantization, bits, *, device, source):
    """The load hook that quantizes ``model``'s Linears as their weights arrive."""
    if _onload is None:
        raise RuntimeError("quantize-on-load is not wired: import openautoglm (its root wires the hub's plugins)")
    return _onload(model, quantization, bits, device=device, source=source)


def on_model_ready(fn: Callable[[nn.Module], None]) -> None:
    """Run ``fn(model)`` on each model openautoglm loads or quantizes for the user."""
    if fn not in _ready:
        _ready.append(fn)


def model_ready(model: nn.Module) -> None:
    for fn in _ready:
        fn(model)
