#!/usr/bin/env bash
# Install what the tests need and run them. On a machine without torch this installs the CPU build
# pinned below (from the local wheel cache on our CI machines); an existing torch (e.g. a CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "$TORCH_PIN"
fi
"$PY" -m pip install -q -e ".[test]"
# Imports point one way (the layers contract in pyproject.toml): an upward import fails here, before the tests.
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import sys, importlinter.cli as c; sys.exit(c.lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))" \
    || { echo "import contract broken: see the layers in pyproject.toml [tool.importlinter]" >&2; exit 1; }
# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero status.
exec "$PY" -m pytest -q "$@"
