#!/bin/bash
# One command for a machine with a CUDA GPU (issue 23): the CUDA tests, then every benchmark's GPU rows, each with a
# time limit so that the whole check ends within about 8 minutes on one GPU; writes $OUT/gpu_check.json (one entry
# per step: command, exit status, seconds, its output) and each step's log beside it.
#
#   bash benchmarks/gpu_check.sh                       # OUT defaults to gpu_check/
#   DRY_RUN=1 bash benchmarks/gpu_check.sh             # any machine: installs nothing, runs no step; checks that
#                                                      # each step's program starts (--help) and takes its flags
#
# A bare GPU image lacks open_clip, hydra-core, omegaconf and ftfy (and villa's other pure-Python dependencies):
# put their wheels in wheels/ beside this repository (`pip download -d wheels open_clip_torch hydra-core omegaconf
# ftfy ...` where there is internet) and they are installed from there, without an index. torch and torchvision
# are the image's own.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 VILLA_MNIST_DIR=${VILLA_MNIST_DIR:-$PWD/shared/data/mnist}
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "dry run: no GPU" > "$OUT/gpu.txt"
else
  if [ -d wheels ]; then
    python -m pip install -q --no-index --find-links wheels --no-deps wheels/*.whl 2>&1 | tail -3
  fi
  python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
fi

python - "$OUT" <<'EOF'
import json, os, re, subprocess, sys, time
from pathlib import Path

out = Path(sys.argv[1])
steps = [  # (name, command, seconds allowed): 480 s in all
    ("cuda_tests", "python -m pytest -q -m cuda tests", 60),
    ("preprocess_rn50", "python -m benchmarks.bench_preprocess --model RN50 --pretrained none --device cuda --images 256 --num_workers 4", 60),
    ("stage1", "python -m benchmarks.bench_stage1 --device cuda", 90),
    ("stage2", "python -m benchmarks.bench_stage2 --model RN50 villa-tiny-rn --device cuda", 120),
    ("detection", f"python -m benchmarks.bench_detection --device cuda --json {out}/detection.json", 60),
    ("demo", f"python -m experiments.demo --device cuda --quiet --out {out}/demo", 90),
]
dry = os.environ.get("DRY_RUN") == "1"
report = {"gpu": (out / "gpu.txt").read_text().strip(), "dry_run": dry, "steps": []}
for name, cmd, limit in steps:
    t = time.perf_counter()
    try:
        if dry:  # the program starts and lists every flag the step passes
            words = cmd.split()
            program, rest = (words[:3], words[3:]) if words[1] == "-m" else (words[:2], words[2:])
            r = subprocess.run(program + ["--help"], capture_output=True, text=True, timeout=limit)
            missing = [f for f in rest if f.startswith("-") and not re.search(rf"(?<![\w-]){f}(?![\w-])", r.stdout)]
            rc, text = (r.returncode or (3 if missing else 0)), r.stdout[-2000:] + r.stderr + (f"\nflags not in --help: {missing}" if missing else "")
        else:
            r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=limit)
            rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    secs = round(time.perf_counter() - t, 1)
    (out / f"{name}.log").write_text(text)
    report["steps"].append({"name": name, "command": cmd, "returncode": rc, "seconds": secs, "output": text[-6000:]})
    print(f"{name}: exit {rc} in {secs} s", flush=True)
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out}/gpu_check.json")
EOF
