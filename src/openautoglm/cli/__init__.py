"""The ``openautoglm`` command: a thin layer that parses, calls the library and prints tables.

Exit status: 0 on success, 2 on bad usage (unknown option, bad value, unknown model), 1 on a failure;
the message goes to stderr, with a traceback only under ``--debug``.
"""

from __future__ import annotations

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

# The command modules add their commands to ``app`` when imported.
from ..errors import OutputExistsError  # noqa: E402
from . import base, compress, memory  # noqa: E402,F401
from ._app import _state, app, console, err_console  # noqa: E402,F401


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
    if isinstance(e, OSError) and e.strerror and not isinstance(e, OutputExistsError):
        # "[Errno 28] ..." is noise for a user: the message and the path
        msg = e.strerror if e.filename is None else f"{e.strerror}: {e.filename}"
    return msg.splitlines()[0] + (" (run with --debug for details)" if "\n" in msg else "")
