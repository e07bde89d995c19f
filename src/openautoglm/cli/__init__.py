"""The ``openautoglm`` command: a thin layer that parses, calls the library and prints tables.

Exit status: 0 on success, 2 on bad usage (unknown option, bad value, unknown model), 1 on a failure;
the message goes to stderr, with a traceback only under ``--debug``.
"""

from __future__ import annotations

import logging
import os
import sys

import click
import typer

try:  # typer >= 0.20 ships its own copy of click; catch the exceptions of both
    from typer import _click as _tclick
except ImportError:  # pragma: no cover - older typer
    _tclick = click
_EXIT = (click.exceptions.Exit, getattr(typer, "Exit", click.exceptions.Exit))
_CLICK_ERR = (click.ClickException, _tclick.exceptions.ClickException)
_ABORT = (click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort))
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
    # fits with them (benchmarks/results/auto_fit_gpu*.json). A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not debug:
        # transformers is chatty about generation defaults; keep our own INFO logs.
        logging.getLogger("transformers").setLevel(logging.ERROR)


# Register the sub-commands (each module adds its commands to ``app``).
from . import base  # noqa: E402,F401

for _name in ("compress", "memory"):  # command modules of the capabilities present in this build
    try:
        __import__(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # pragma: no cover - only while that module does not exist
        if _e.name != f"{__name__}.{_name}":
            raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns (and exits with) the status code."""
    args = sys.argv[1:] if argv is None else argv
    _state["debug"] = "--debug" in args
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="openautoglm", standalone_mode=False)
        code = 0
    except _EXIT as e:
        code = e.exit_code
    except _CLICK_ERR as e:  # usage errors: exit 2
        e.show(file=sys.stderr)
        code = e.exit_code
    except _ABORT:
        err_console.print("aborted")
        code = 1
    except (ValueError, TypeError, KeyError) as e:
        if _state["debug"]:
            raise
        if _rank_tag() in ("", "[rank 0] "):  # a usage error is the same on every rank: rank 0 says it
            err_console.print(f"[bold red]error:[/] {_one_line(e)}", highlight=False, soft_wrap=True)
        code = 2
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if _state["debug"]:
            raise
        from ..hub.load import is_oom

        what = "not enough memory" if is_oom(e) and "not enough memory" not in str(e) else type(e).__name__
        err_console.print(f"{_rank_tag()}[bold red]error:[/] {what}: {_one_line(e)}", highlight=False,
                          soft_wrap=True)
        code = 1
    if argv is None:
        sys.exit(code)
    return code


def _rank_tag() -> str:
    """``"[rank N] "`` in a process started by torchrun (``--tp``), else ``""``."""
    return f"[rank {os.environ['RANK']}] " if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.strerror:  # "[Errno 17] ..." is noise for a user: the message and the path
        msg = e.strerror if e.filename is None else f"{e.strerror}: {e.filename}"
    return msg.splitlines()[0] + (" (run with --debug for details)" if "\n" in msg else "")
