"""Peak host memory of rmexp-export (one tensor at a time) against the whole-model merge it replaced.

`python bench/export_memory.py --checkpoint <run dir> [--dtype bfloat16] [--paths new,old]`

Each export runs in a fresh process (tests/test_export.py's MEMORY_PROBE): it imports what the export
uses (torch, transformers, peft, bitsandbytes, rmexp.export), reads its RSS (the import baseline), resets
the kernel's peak RSS (`/proc/self/clear_refs`, VmHWM), exports, and reports the peak RSS above that
baseline beside the bytes of safetensors written. Lazy imports during the export and glibc's heap
slack count, as they do for a user. `old` is the whole-model merge (de-quantize everything, cast to fp32,
merge, cast), kept as `reference_export` in tests/test_export.py. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown CPU")


def parameters(out: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                count = 1
                for d in st.get_slice(key).get_shape():
                    count *= d
                n += count
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run dir (such as `make train`'s)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--paths", default="new,old", help="which exports to measure, in this order")
    args = parser.parse_args()

    from test_export import peak_rss_of_export

    with tempfile.TemporaryDirectory(prefix="rmexp-export-bench-") as tmp:
        results = {which: peak_rss_of_export(Path(args.checkpoint), Path(tmp) / which, which, args.dtype)
                   for which in args.paths.split(",")}
        n = parameters(Path(tmp) / next(iter(results)))
    gb = 1e9
    print(f"{cpu_model()}; {args.checkpoint}; dtype {args.dtype}; {n / 1e6:.0f}M parameters written")
    print("| export | import baseline GB | peak RSS GB | above baseline GB | written GB | above / written | "
          "GB per 1B parameters | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for which, r in results.items():
        print(f"| {which} | {r['baseline'] / gb:.2f} | {r['peak'] / gb:.2f} | {r['above_baseline'] / gb:.2f} | "
              f"{r['exported_bytes'] / gb:.3f} | {r['ratio']:.2f}x | {r['above_baseline'] / n:.2f} | {r['seconds']:.1f} |")
    print(json.dumps({"cpu": cpu_model(), "checkpoint": args.checkpoint, "dtype": args.dtype, "parameters": n, **results}))


if __name__ == "__main__":
    main()
