"""Device run of the decode-kernel tuning alone (7B layer shapes and the fused q/k/v, gate/up shapes; M = 1, 8):
writes ``quant_tune_h100.json`` (every configuration's time, the best per shape, the copy rate) to --out."""
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import quant_tune  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "."))
budget = float(sys.argv[2]) if len(sys.argv) > 2 else 150.0
t0 = time.time()
shapes = [(4096, 4096, [1, 8]), (11008, 4096, [1, 8]), (4096, 11008, [1, 8]), (12288, 4096, [1]), (22016, 4096, [1])]
res = quant_tune.run(torch.device("cuda"), torch.bfloat16, shapes, [], 2048, budget,
                     lambda *a: print(f"[{time.time() - t0:6.1f}s]", *a, flush=True))
res.update(device=torch.cuda.get_device_name(), torch=torch.__version__, git_commit=os.environ.get("OAG_GIT_COMMIT", "?"),
           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), wall_s=time.time() - t0)
out.mkdir(parents=True, exist_ok=True)
(out / "quant_tune_h100.json").write_text(json.dumps(res, indent=1, default=str))
for r in res["rows"]:
    print(r["N"], r["K"], r["M"], "bf16", round(r["bf16_GBps"]), "tinygemm", round(r.get("tinygemm_GBps", 0)),
          "w4", round(r.get("f5_GBps", 0)), r.get("f5_cfg"), "w8", round(r.get("f8_GBps", 0)), "fp8", round(r.get("f9_GBps", 0)))
