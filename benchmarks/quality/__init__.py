"""Quality benchmarks (perplexity on real pretrained models); run as ``python -m benchmarks.quality.<name>``."""

import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parents[2] / "src")
if _SRC not in sys.path:  # this checkout's package, not an installed copy
    sys.path.insert(0, _SRC)
