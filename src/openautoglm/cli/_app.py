"""The typer application, its consoles and the root options, shared by every command module."""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="openautoglm",
    help="Shrink LLM memory (weights, KV cache, activations) and see where the memory goes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors in the log."),
) -> None:
    _state["debug"] = debug
    # Before any CUDA allocation: expandable segments keep reserved memory near allocated memory. A budgeted pick
    # (compress --budget) OOMs under a 14 GiB cap with the default allocator (4 GiB reserved but unallocated) and
    # fits with them (benchmarks/results/auto/fit_gpu*.json). A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not debug:
        # transformers is chatty about generation defaults; keep our own INFO logs.
        logging.getLogger("transformers").setLevel(logging.ERROR)
