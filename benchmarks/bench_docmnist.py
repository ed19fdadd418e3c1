"""Time DocMNIST generation (all three splits, PNGs and annotations) at several budgets.

    python -m benchmarks.bench_docmnist                        # budget 30000 + val 10000 + test 10000, 3 repeats
    python -m benchmarks.bench_docmnist --budgets 30000 300000 1000000 --repeats 1

Prints, per budget, the wall-clock seconds of each repeat (median and best), the process CPU seconds, images/s and
the peak resident memory. Outputs are deleted only after the last repeat: on this kind of disk, deleting thousands
of files slows the writes of the next tens of seconds, which would be measured as generator time.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import tempfile
import time

from docmnist.generate_docmnist import generate


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_docmnist",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--budgets", type=int, nargs="+", default=[30000])
    p.add_argument("--val_budget", type=int, default=10000)
    p.add_argument("--test_budget", type=int, default=10000)
    p.add_argument("--target", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mnist_dir", default=None)
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args()
    print(
        f"{'budget':>8} {'images':>7} {'median s':>9} {'best s':>7} {'CPU s':>6} {'images/s':>9} {'peak RSS MB':>11}  runs"
    )
    outs = []
    try:
        for b in a.budgets:
            walls, cpus, n = [], [], 0
            for _ in range(a.repeats):
                out = tempfile.mkdtemp(prefix="bench_docmnist_")
                outs.append(out)
                c0, t0 = time.process_time(), time.perf_counter()
                path = generate(
                    b,
                    a.target,
                    out_dir=out,
                    mnist_dir=a.mnist_dir,
                    val_budget=a.val_budget,
                    test_budget=a.test_budget,
                    workers=a.workers,
                    progress=False,
                )
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                info = json.loads((path / "generation.json").read_text())
                n = sum(s["images"] for s in info["splits"].values())
            med = statistics.median(walls)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            runs = " ".join(f"{w:.2f}" for w in walls)
            print(
                f"{b:>8} {n:>7} {med:>9.2f} {min(walls):>7.2f} {statistics.median(cpus):>6.2f} {n / med:>9.0f} "
                f"{rss:>11.0f}  {runs}",
                flush=True,
            )
    finally:
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
