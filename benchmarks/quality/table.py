"""Print the fake-quantization results JSON as a markdown table: ``python -m benchmarks.quality.table``."""

from __future__ import annotations

import json
import sys

from .methods_fakequant import OUT


def main(path=OUT) -> None:
    data = json.loads(open(path).read())
    for model, entry in data.items():
        res = entry["results"]
        m = entry["meta"]
        threads = f", {m['threads']} threads" if "threads" in m else ""
        print(f"\n### {model}: fp32 perplexity {res['fp32']['perplexity']:.3f} on {entry['eval_tokens']} tokens "
              f"({m.get('host_cpu', m['device'])}{threads}; torch {m['torch']}, transformers {m['transformers']}, {m['date']}, {m['git_commit'][:8]})\n")
        print("| variant | method | bits | group | perplexity | change | quantize s |")
        print("|---|---|---|---|---|---|---|")
        for name, r in res.items():
            if name == "fp32":
                continue
            if "error" in r:
                print(f"| {name} | {r['error'][:60]} | | | | | |")
                continue
            print(f"| {name} | {r.get('method', r.get('package', ''))} | {r.get('bits', '')} | "
                  f"{r.get('group_size', '')} | {r['perplexity']:.3f} | {r['change_pct']:+.2f}% | {r['quantize_s']:.1f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
