"""Time DocMNIST generation (all three splits, PNGs and annotations) at several budgets.

    python benchmarks/bench_docmnist.py --budgets 30000 300000 1000000

Prints images/s and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time

from docmnist.generate_docmnist import generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[30000, 300000])
    p.add_argument("--target", type=int, default=16)
    p.add_argument("--mnist_dir", default=None)
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args()
    print(f"{'budget':>10} {'images':>8} {'seconds':>8} {'images/s':>9} {'peak RSS MB':>11}")
    for b in a.budgets:
        out = tempfile.mkdtemp(prefix="bench_docmnist_")
        try:
            t0 = time.perf_counter()
            path = generate(
                b,
                a.target,
                out_dir=out,
                mnist_dir=a.mnist_dir,
                val_budget=b // 3,
                test_budget=b // 3,
                workers=a.workers,
                progress=False,
            )
            secs = time.perf_counter() - t0
            info = json.loads((path / "generation.json").read_text())
            n = sum(s["images"] for s in info["splits"].values())
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{b:>10} {n:>8} {secs:>8.2f} {n / secs:>9.0f} {rss:>11.0f}", flush=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
