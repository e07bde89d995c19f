#!/usr/bin/env bash
# The main job on the bundled model: install, show where its memory goes, measure its held-out
# perplexity and generate; then compress it (INT8 W8A8 and INT4 weight-only), reload the saved
# checkpoints and measure again. No download beyond the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "${TORCH_PIN:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e .
OUT=${OUT_DIR:-out}
PROMPT='The :mod:`json` module'
set -x
openautoglm info open-autoglm-base
openautoglm eval open-autoglm-base --max-tokens 8192
openautoglm generate open-autoglm-base "$PROMPT" --max-new-tokens 48
openautoglm compress open-autoglm-base --bits 8 --out "$OUT/base-w8a8" --overwrite
openautoglm compress open-autoglm-base --bits 4 --out "$OUT/base-w4" --overwrite
openautoglm info "$OUT/base-w4"
openautoglm eval "$OUT/base-w8a8" --max-tokens 8192
openautoglm eval "$OUT/base-w4" --max-tokens 8192
openautoglm generate "$OUT/base-w4" "$PROMPT" --max-new-tokens 48
