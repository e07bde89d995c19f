"""``model.generate(..., cache_implementation="static")`` through the compiled CUDA-graph decode (:class:`Generator`).

transformers' generation loop does host work between decode steps (logits processors, stopping criteria, cache
bookkeeping): on the H100 it adds ~2.3 ms per token to a 6.3 ms bf16 7B step and ~3.5 ms to our w4 model's 3.0 ms
step. :func:`enable_fast_generate` installs an instance-level ``generate`` that hands the calls
:class:`~openautoglm.generation.generator.Generator` serves exactly (static cache asked for, greedy or sampling with
temperature / top-k / top-p, no padding, token ids out) to one cached ``Generator(model)`` -- layer step compiled
once, whole step replayed from a CUDA graph, no host sync per token -- and every other call to transformers'
``generate`` unchanged, logging at DEBUG why. The output follows transformers' rules: ``(batch, prompt + steps)``
ids, a row's tokens after its EOS set to ``pad_token_id`` (the first EOS when unset), stopping once every row has
finished, EOS held back for ``min_new_tokens``. Models from ``openautoglm.AutoModelForCausalLM.from_pretrained``
and models quantized by :mod:`openautoglm.quant` have it installed; ``OPENAUTOGLM_FAST_GENERATE=0`` (set before
loading / quantizing) or ``enable_fast_generate(model, enabled=False)`` opts out. The class's ``generate`` stays
reachable as ``type(model).generate(model, ...)``.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
import weakref

import torch
from torch import nn

from .. import _hf
from .._hf import generate as _hf_generate
from .._util import flags
from .generator import Generator

log = logging.getLogger(__name__)
ENV = flags.FAST_GENERATE
CHECK_EVERY = 8  # decode steps between the host's "has every row finished?" checks (at most 7 steps wasted)
_OFF = "_openautoglm_fast_generate_off"  # set on a model whose user turned routing off: the defaults leave it alone


class RoutedGenerate:
    """The instance-level ``model.generate``: the compiled decode for the calls it serves, else the original.

    Holds the model weakly (no reference cycle: the model's memory goes when the user drops it); ``deepcopy``
    and pickling of the model rebind it to the copy, without the compiled state.
    """

    def __init__(self, model: nn.Module, previous=None, allow_cpu: bool = False) -> None:
        self._model = weakref.ref(model)
        self.previous = previous  # an instance-level generate installed before this one, restored on disable
        self.allow_cpu = allow_cpu
        self._gen = self._key = self._unsupported = None
        self._logged: set[str] = set()
        self.counts = {"fast": 0, "transformers": 0}  # calls served by each path (since installation)
        try:
            self.__signature__ = inspect.signature(type(model).generate.__get__(model))
        except (TypeError, ValueError):
            pass
        self.__doc__ = type(model).generate.__doc__

    def __deepcopy__(self, memo):
        model = self._model()
        return RoutedGenerate(memo.get(id(model), model), copy.deepcopy(self.previous, memo), self.allow_cpu)

    def __reduce__(self):
        return RoutedGenerate, (self._model(), self.previous, self.allow_cpu)

    def original(self, model: nn.Module):
        """What ``model.generate`` was before routing was installed."""
        return self.previous if self.previous is not None else type(model).generate.__get__(model)

    def __call__(self, *args, **kwargs):
        model = self._model()
        if model is None:
            raise ReferenceError("the model of this generate method no longer exists")
        why = self._model_blocker(model)
        call = None
        if why is None:
            try:
                call = _hf_generate.resolve(model, args, kwargs)
            except Exception as e:  # noqa: BLE001 - transformers' generate then runs the call and raises its own error
                call = f"cannot resolve the generation arguments ({type(e).__name__}: {e})"
            why = call if isinstance(call, str) else _beyond_positions(model, call) or self._generator(model)
        if why is not None:
            self._note(model, "transformers", f"model.generate of {type(model).__name__} uses transformers' "
                                              f"generate: {why}")
            self.counts["transformers"] += 1
            return self.original(model)(*args, **kwargs)
        self.counts["fast"] += 1
        self._note(model, "fast", f"model.generate of {type(model).__name__} runs openautoglm's compiled static-cache "
                                  f"decode ({'CUDA graph' if self._gen.cuda_graph else 'eager, allow_cpu'}); "
                                  f"opt out: {ENV}=0 or enable_fast_generate(model, enabled=False)")
        call.log_held()
        return _decode(self._gen, call)

    # ------------------------------------------------------------------ helpers
    def _model_blocker(self, model: nn.Module) -> str | None:
        if model.training:
            return "the model is in training mode (dropout); call model.eval()"
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            return "torch.distributed is initialized (sharded or synchronized generation)"
        p = next(model.parameters(), None)
        if p is None or p.device.type not in ("cuda", "cpu") or (p.device.type == "cpu" and not self.allow_cpu):
            return (f"the model is on {None if p is None else p.device} (the compiled path runs on CUDA; "
                    "enable_fast_generate(..., allow_cpu=True) runs it eagerly on the CPU)")
        return None

    def _generator(self, model: nn.Module) -> str | None:
        """Build (or reuse) the Generator; rebuilt when modules, tensors or devices changed since (a captured
        CUDA graph must not replay old weights). Returns why it cannot serve the model, or None."""
        mods = tuple(id(m) for m in model.modules())
        tens = tuple((t.data_ptr(), t.device) for t in itertools.chain(model.parameters(), model.buffers()))
        devices = {d for _, d in tens}
        if len(devices) != 1 or next(iter(devices)).type == "meta":
            return f"the model's tensors lie on {sorted(map(str, devices))} (one device needed)"
        key = hash((mods, tens))
        if key != self._key:
            self._gen = self._unsupported = None
            try:
                self._gen = Generator(model)
            except ValueError as e:
                self._unsupported = f"the compiled decode does not support this model ({e})"
            self._key = key
        return self._unsupported

    def _note(self, model: nn.Module, path: str, text: str) -> None:
        if path not in self._logged:
            self._logged.add(path)
            log.info(text)
        else:
            log.debug(text)


def _beyond_positions(model: nn.Module, call: _hf_generate.GenerateCall) -> str | None:
    limit = getattr(_hf.text_config(model.config), "max_position_embeddings", None)
    need = call.input_ids.shape[1] + call.max_new_tokens
    return f"prompt + new tokens = {need} exceed max_position_embeddings {limit}" if limit and need > limit else None


def _decode(gen, call: _hf_generate.GenerateCall) -> torch.Tensor:
    """Run ``call`` through ``gen`` and shape the output as transformers' ``generate`` does."""
    sampling = dict(do_sample=True, temperature=call.temperature, top_k=call.top_k, top_p=call.top_p) \
        if call.do_sample else {}
    res = gen.generate(call.input_ids, call.max_new_tokens, eos_token_id=call.eos, min_new_tokens=call.min_new_tokens,
                       check_every=CHECK_EVERY, **sampling)
    new = res.tokens[:, call.input_ids.shape[1]:]
    if call.eos is not None:  # a row is done after its first EOS; later positions hold pad; stop once all are done
        hit = torch.isin(new, torch.tensor(call.eos, device=new.device))
        ends = torch.where(hit.any(1), hit.int().argmax(1) + 1, new.shape[1])
        steps = int(ends.max())
        new = new[:, :steps].masked_fill(torch.arange(steps, device=new.device) >= ends[:, None], call.pad)
    return torch.cat([call.input_ids.long(), new.to(call.input_ids.device)], 1)


def routed(model: nn.Module) -> RoutedGenerate | None:
    """The installed router of ``model``, or None."""
    g = vars(model).get("generate")
    return g if isinstance(g, RoutedGenerate) else None


def enable_fast_generate(model: nn.Module, enabled: bool = True, *, allow_cpu: bool = False) -> nn.Module:
    """Route ``model.generate(..., cache_implementation="static")`` to the compiled decode (see the module docstring).

    Parameters
    ----------
    model : a transformers causal LM (any class with ``generate``; unsupported families fall back per call).
    enabled : install (idempotent; the cached compiled state is kept) or, with False, remove it and free the
        cached Generator (its static KV cache and CUDA graphs).
    allow_cpu : also route on the CPU, where the step runs eagerly (no speed-up; for tests).

    Returns ``model``.
    """
    if not isinstance(model, nn.Module) or not callable(getattr(type(model), "generate", None)):
        raise TypeError(f"enable_fast_generate takes a model with a generate method, got {type(model).__name__}")
    r = routed(model)
    if not enabled:
        if r is not None:
            del vars(model)["generate"]
            if r.previous is not None:
                vars(model)["generate"] = r.previous
        vars(model)[_OFF] = True
        return model
    vars(model).pop(_OFF, None)
    if r is not None:
        r.allow_cpu = allow_cpu
        return model
    vars(model)["generate"] = RoutedGenerate(model, vars(model).get("generate"), allow_cpu)
    return model


def enable_by_default(model: nn.Module) -> None:
    """Install routing on a model openautoglm hands to the user, unless ``OPENAUTOGLM_FAST_GENERATE`` is 0/false/
    no/off or the user turned it off on this model."""
    if not flags.enabled(ENV):
        log.debug("%s is off: model.generate left to transformers", ENV)
        return
    if isinstance(model, nn.Module) and callable(getattr(type(model), "generate", None)) \
            and not vars(model).get(_OFF) and routed(model) is None:
        enable_fast_generate(model)
