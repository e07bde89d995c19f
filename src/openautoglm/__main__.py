"""``python -m openautoglm`` runs the command-line interface."""

from .cli import main

main()
