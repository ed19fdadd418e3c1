"""Command start-up: how long ``--help`` and a one-line input error take, as whole processes.

    python -m benchmarks.bench_startup [--runs 5] [--json docs/results/benchmarks/startup.json]

Each command runs once as a warm-up, then ``--runs`` times; reported per command: the exit status, the median,
min and max wall seconds, and the peak resident memory of the process (``ru_maxrss`` of the finished child, which
is that process's own peak).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

from benchmarks.results import command_line, save

COMMANDS = {
    "python -m villa.stage2 --help": ["-m", "villa.stage2", "--help"],
    "python -m villa.stage2 data_dir=/nonexistent/data": ["-m", "villa.stage2", "data_dir=/nonexistent/data"],
    "python -m villa.stage1 --help": ["-m", "villa.stage1", "--help"],
    "python -m preprocess data_dir=/nonexistent/data": ["-m", "preprocess", "data_dir=/nonexistent/data"],
}


def run_once(args: list[str]) -> tuple[int, float, float]:
    """(exit status, wall seconds, peak RSS in MB) of one run as its own process."""
    t0 = time.perf_counter()
    pid = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 1024


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_startup", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = {}
    for name, args in COMMANDS.items():
        run_once(args)  # warm-up: the page cache, Python's bytecode cache
        runs = [run_once(args) for _ in range(a.runs)]
        walls = [w for _, w, _ in runs]
        rows[name] = {
            "exit": sorted({c for c, _, _ in runs}),
            "median_s": round(statistics.median(walls), 3),
            "min_s": round(min(walls), 3),
            "max_s": round(max(walls), 3),
            "peak_rss_mb": round(max(m for _, _, m in runs), 1),
        }
        print(f"{name}: {rows[name]}", flush=True)
    res = {
        "command": command_line("benchmarks.bench_startup", argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "runs": a.runs,
        "commands": rows,
    }
    save(res, a.json)
    return res


if __name__ == "__main__":
    main()
