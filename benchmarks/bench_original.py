"""villa against the original ViLLA code (github.com/StanfordMIMI/villa), step by step and end to end, interleaved.

    git clone https://github.com/StanfordMIMI/villa /path/to/villa-original      # any checkout of the original
    python -m benchmarks.bench_original --original /path/to/villa-original [--repeats 3] [--json out.json]

Both pipelines run the same four commands as whole processes (the README's pipeline table), with the same
settings, the same starting weights and the same MNIST files:

1. ``generate_docmnist.py`` (train budget ``--budget`` at ``--target``, val budget 10000: the original's fixed one;
   villa also writes a test split of ``--target`` pairs, about one image, because it cannot write none);
2. ``preprocess_docmnist.py`` (attribute prompts and region embeddings, images at their native 84 x 84, ROI-Align
   14 x 14, layer4 and the attention pool); reported also as regions/s;
3. Stage 1 (``--stage1_epochs`` epochs, batch 48, AdamW lr 1e-4: the original's experiment config), timed to the
   end of training, then the mapping of the train and val splits (timed apart, from the processes' own output);
4. Stage 2 (``--stage2_epochs`` epochs, batch ``--stage2_batch``, Adam lr 5e-5 with L2 0.2, a val pass per epoch);
   reported as the whole process and as the steady epoch (train + val + checkpoint), from the processes' output.

The original runs from a copy of ``--original`` under ``--work`` with its own code untouched; on a machine
without CUDA, ``benchmarks/original_shim`` (on its PYTHONPATH only) keeps its ``.cuda()`` tensors on the CPU and
stands in for OpenAI's ``clip`` package, which would download weights: ``clip.load`` returns the harness's model.
That model is an open_clip ModifiedResNet CLIP with the original's shapes where its code fixes them (224-pixel
attention pool: 14 x 14 ROIs; 1024-d embeddings: its Stage 1 reshapes to 1024) and a narrow trunk (width 16,
layers 1-1-1-1) so that the whole comparison fits a CPU; the weights are random (seed 0) and the same on both
sides. Its extra packages (sparse, rich, pyrootutils, python-dotenv) go to ``--deps`` with
``pip install --target``; villa's environment is untouched. DataLoader workers are ``--workers`` on both sides
(the original's configs say 8, more than this kind of machine has cores).

Interleaving: in each repeat, each step runs on both sides back to back, the side that goes first alternating
between repeats, so both sides see the same machine load. Reported per step: every repeat's seconds, the median,
min and max per side, and the ratio of the medians (original / villa: above 1, villa is faster).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.results import command_line, save
from villa.core.errors import VillaError, exit_on_error

REPO = Path(__file__).resolve().parent.parent
SHIM = Path(__file__).resolve().parent / "original_shim"
DEPS = ("sparse", "rich", "pyrootutils", "python-dotenv")
MNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# the harness's CLIP: the original's fixed shapes, a narrow trunk (module docstring)
MODEL_CFG = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1},
}
STEPS = ("generate", "preprocess", "stage1", "stage2")


def _mnist_dir() -> Path:
    for cand in (os.environ.get("VILLA_MNIST_DIR"), REPO / "data" / "mnist"):
        if cand and all((Path(cand) / f).is_file() or (Path(cand) / f"{f}.gz").is_file() for f in MNIST):
            return Path(cand)
    raise VillaError(
        "MNIST IDX files not found: set VILLA_MNIST_DIR to a folder holding train-/t10k- images and labels"
    )


def setup(original: Path, work: Path, deps: Path) -> dict:
    """Copy the original, give it MNIST in torchvision's layout, install its extra packages, write the model."""
    import torch

    from villa.models.clip import clip_checkpoint_state

    if (
        not (original / "villa" / "stage1.py").is_file()
        or not (original / "docmnist" / "generate_docmnist.py").is_file()
    ):
        raise VillaError(
            f"--original={original} is not a checkout of github.com/StanfordMIMI/villa (no villa/stage1.py)"
        )
    orig = work / "original"
    if orig.exists():
        shutil.rmtree(orig)
    shutil.copytree(original, orig, ignore=shutil.ignore_patterns(".git", "data", "checkpoints", "outputs"))
    raw = orig / "data" / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    src = _mnist_dir()
    for f in MNIST:
        if (src / f).is_file():
            shutil.copyfile(src / f, raw / f)
        else:
            with gzip.open(src / f"{f}.gz", "rb") as fi, open(raw / f, "wb") as fo:
                shutil.copyfileobj(fi, fo)
    if not (deps / "sparse").is_dir() or not (deps / "pyrootutils").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), *DEPS], check=True)
        for p in deps.glob("numpy*"):  # villa's numpy stays the one in use
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**MODEL_CFG)
    files = {"villa": work / "bench_clip.pt", "stub": work / "bench_clip_open_clip.pt", "clip_pth": work / "clip.pth"}
    torch.save(clip_checkpoint_state(model, "villa-bench-rn", MODEL_CFG), files["villa"])
    torch.save({"model_cfg": MODEL_CFG, "state_dict": model.state_dict()}, files["stub"])
    torch.save(model.state_dict(), files["clip_pth"])  # the original's Stage 2 reads ${checkpoint_dir}/clip.pth
    return {k: str(v) for k, v in files.items()}


def original_env(work: Path, deps: Path, files: dict) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(SHIM), str(deps), str(work / "original")]),
        PROJECT_DIR=str(work / "original"),
        VILLA_BENCH_CLIP=files["stub"],
        PYTHONUNBUFFERED="1",
        PYTHONWARNINGS="ignore",
        VILLA_ORIGINAL_SHIM="1",
        TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",  # the original was written for torch < 2.6: torch.load of numpy arrays
    )
    if not _cuda():
        env["VILLA_ORIGINAL_ON_CPU"] = "1"
    return env


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_original_weights(work: Path, env: dict, files: dict) -> None:
    """The original's Stage 2 loads clip.pth with strict=False: make sure every weight of its model is in it."""
    code = (
        "import torch\nfrom villa.utils.utils import build_vision_encoder\n"
        f"sd = torch.load({files['clip_pth']!r})\nm = build_vision_encoder(sd, 1024)\n"
        "missing = [k for k in m.state_dict() if k not in sd]\n"
        "assert not missing, missing\nassert m.visual.input_resolution == 224\nprint('ok', len(m.state_dict()))"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=work / "original", capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.startswith("ok"):
        raise VillaError(f"the original's Stage 2 model does not take the harness's weights: {r.stderr.strip()[-300:]}")


def _rss(pid: int) -> tuple[int, int]:
    """Resident bytes of ``pid`` alone and of ``pid`` with its descendants, now (Linux /proc; 0 elsewhere). Pages a
    forked worker shares with its parent count once per process in the second, so it is an upper bound."""
    own, total, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                rss = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:")), 0)
            own, total = (rss if p == pid else own), total + rss
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return own, total


def run_timed(cmd: list, cwd: Path, env: dict, log: Path) -> tuple[float, list, dict]:
    """Run a command; return its wall seconds, (seconds since start, line) for every output line, and its peak
    memory, sampled every 0.1 s: ``peak_rss_mb`` of the command's process, ``peak_tree_rss_mb`` of it with its
    worker processes (summed). The kernel's ``ru_maxrss`` is not used: a forked child counts its parent's pages
    until it execs, so it would report the harness's own memory."""
    import threading

    t0 = time.perf_counter()
    lines = []
    peak = {"own": 0, "tree": 0}
    with open(log, "w") as f:
        p = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        done = threading.Event()

        def sample():
            while not done.wait(0.1):
                own, tree = _rss(p.pid)
                peak["own"], peak["tree"] = max(peak["own"], own), max(peak["tree"], tree)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for line in p.stdout:
            t = time.perf_counter() - t0
            for part in line.replace("\r", "\n").splitlines():
                lines.append((t, part))
            f.write(line)
        rc = p.wait()
        done.set()
        sampler.join()
    secs = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(ln + "\n" for _, ln in lines[-15:])
        raise VillaError(f"{' '.join(map(str, cmd[:3]))}... failed (exit {rc}; log {log}):\n{tail}")
    memory = {"peak_rss_mb": round(peak["own"] / 2**20, 1), "peak_tree_rss_mb": round(peak["tree"] / 2**20, 1)}
    return secs, lines, memory


def cpu_info() -> dict:
    """The CPU the comparison ran on (villa.core.runtime.machine_info)."""
    from villa.core.runtime import machine_info

    return machine_info()


def _first(lines: list, pattern: str) -> float:
    for t, ln in lines:
        if re.search(pattern, ln):
            return t
    raise VillaError(f"no output line matches {pattern!r}")


def _all(lines: list, pattern: str) -> list:
    return [t for t, ln in lines if re.search(pattern, ln)]


class Side:
    """One pipeline (the original's or villa's): the four commands and how to read their output."""

    def __init__(self, name: str, work: Path, a, files: dict, deps: Path):
        self.name, self.a, self.files = name, a, files
        self.root = work / "original" if name == "original" else work / "villa"
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = work / "logs"
        self.logs.mkdir(exist_ok=True)
        if name == "original":
            self.env = original_env(work, deps, files)
        else:
            self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "VILLA_MNIST_DIR": str(_mnist_dir())}
        self.data = None

    def run(self, step: str, rep: int) -> dict:
        log = self.logs / f"{self.name}_{step}_{rep}.log"
        secs, lines, memory = run_timed(getattr(self, f"cmd_{step}")(), self.root, self.env, log)
        out = {"seconds": secs, **memory}
        out.update(getattr(self, f"read_{step}")(lines, secs))
        return out

    # 1. DocMNIST
    def cmd_generate(self):
        a = self.a
        args = [f"--attribute_budget={a.budget}", f"--target_sample_complexity={a.target}"]
        if self.name == "original":
            return [sys.executable, "docmnist/generate_docmnist.py", *args]
        return [
            sys.executable,
            str(REPO / "docmnist" / "generate_docmnist.py"),
            *args,
            "--val_budget=10000",
            f"--test_budget={a.target}",
            f"--out_dir={self.root / 'data'}",
            "--overwrite",
            "--quiet",
        ]

    def read_generate(self, lines, secs):
        dirs = sorted((self.root / "data").glob(f"docmnist_{self.a.budget}_*"), key=lambda p: p.stat().st_mtime)
        self.data = dirs[-1]
        return {}

    # 2. preprocessing
    def cmd_preprocess(self):
        if self.name == "original":
            return [sys.executable, "preprocess/preprocess_docmnist.py", f"--data_dir={self.data.name}"]
        return [
            sys.executable,
            str(REPO / "preprocess" / "preprocess_docmnist.py"),
            f"--data_dir={self.data}",
            f"--pretrained={self.files['villa']}",
            "--model=auto",
            f"--num_workers={self.a.workers}",
            "--quiet",
        ]

    def read_preprocess(self, lines, secs):
        import pandas as pd

        ann = pd.read_feather(self.data / "annotations.feather", columns=["num_regions"])
        n = int(ann["num_regions"].sum())  # every region of every split is embedded (villa's test split: ~1 image)
        return {"regions": n, "regions_per_s": n / secs}

    # 3. Stage 1: training to the end, then the mapping
    def cmd_stage1(self):
        a = self.a
        common = [f"data_dir={self.data}", f"epochs={a.stage1_epochs}", "batch_size=48"]
        if self.name == "original":
            w = [f"dataloader.{s}.num_workers={a.workers}" for s in ("train", "val")]
            return [
                sys.executable,
                "villa/stage1.py",
                "experiment=docmnist_stage1",
                *common,
                *w,
                f"checkpoint_dir={self.root / 'ckpt'}",
                "model.emb_dim=1024",
            ]
        return [
            sys.executable,
            "-m",
            "villa.stage1",
            "experiment=docmnist_stage1",
            *common,
            "lr=1e-4",
            f"checkpoint_dir={self.root / 'ckpt' / 'stage1'}",
            "resume=false",
            "progress=false",
        ]

    def read_stage1(self, lines, secs):
        n = self.a.stage1_epochs
        if self.name == "original":
            start = _first(lines, r"Generating region-attribute mappings on split train")
            ends = _all(lines, r"^Finished in \d+s")  # its train loop's line after each epoch
        else:
            ends = _all(lines, r"epoch \d+/\d+ ")
            start = _first(lines, r"mapping \d+ images")  # villa.stage1's line when the mapping starts
        if len(ends) != n:
            raise VillaError(f"{self.name} Stage 1: {len(ends)} epoch ends in its output, expected {n}")
        epochs = [b - a for a, b in zip(ends, ends[1:])]  # epochs 2..n (the first includes loading)
        k = max(1, len(epochs) // 4)
        early, late = (statistics.median(epochs[:k]), statistics.median(epochs[-k:])) if epochs else (None, None)
        return {
            "train_seconds": start,
            "mapping_seconds": secs - start,
            "epoch_seconds": [round(e, 3) for e in epochs],
            "late_over_early": round(late / early, 3) if epochs else None,
        }

    # 4. Stage 2
    def cmd_stage2(self):
        a = self.a
        common = [f"data_dir={self.data}", f"epochs={a.stage2_epochs}", f"batch_size={a.stage2_batch}"]
        if self.name == "original":
            w = [f"dataloader.{s}.num_workers={a.workers}" for s in ("train", "val")]
            return [
                sys.executable,
                "villa/stage2.py",
                "experiment=docmnist_stage2",
                *common,
                *w,
                f"checkpoint_dir={self.root / 'ckpt'}",
                f"model.clip_weights={self.files['clip_pth']}",
            ]
        return [
            sys.executable,
            "-m",
            "villa.stage2",
            "experiment=docmnist_stage2",
            *common,
            f"model.pretrained={self.files['villa']}",
            "model.name=auto",
            f"num_workers={a.workers}",
            f"checkpoint_dir={self.root / 'ckpt' / 'stage2'}",
            "resume=false",
            "progress=false",
        ]

    def read_stage2(self, lines, secs):
        # an epoch ends when its val loss is printed (the original: "Loss = ..." after its val pass; villa: the epoch line)
        ends = _all(lines, r"^Loss = ") if self.name == "original" else _all(lines, r"epoch \d+/\d+ .*val_loss=")
        if len(ends) != self.a.stage2_epochs:
            raise VillaError(
                f"{self.name} Stage 2: {len(ends)} epoch ends in its output, expected {self.a.stage2_epochs}"
            )
        steady = [b - a for a, b in zip(ends, ends[1:])]
        return {"epoch_seconds": statistics.median(steady) if steady else None, "setup_seconds": ends[0]}


def summarize(reps: dict, steps=STEPS) -> dict:
    """Per measure: both sides' runs, medians, min and max, and the ratio of the medians (the steps that ran; end to
    end when all did)."""
    out = {}
    measures = {
        "generate": ("generate", "seconds"),
        "preprocess": ("preprocess", "seconds"),
        "preprocess_regions_per_s": ("preprocess", "regions_per_s"),
        "stage1_train": ("stage1", "train_seconds"),
        "mapping": ("stage1", "mapping_seconds"),
        "stage1_process": ("stage1", "seconds"),
        "stage2_epoch": ("stage2", "epoch_seconds"),
        "stage2_process": ("stage2", "seconds"),
        "end_to_end": (None, "seconds"),
    }
    for name, (step, key) in measures.items():
        if (step is None and tuple(steps) != STEPS) or (step is not None and step not in steps):
            continue
        row = {}
        for side in ("original", "villa"):
            if step is None:
                vals = [sum(r[s]["seconds"] for s in STEPS) for r in reps[side]]
            else:
                vals = [r[step][key] for r in reps[side] if r[step].get(key) is not None]
            if not vals:
                break
            row[side] = {
                "runs": [round(v, 3) for v in vals],
                "median": round(statistics.median(vals), 3),
                "min": round(min(vals), 3),
                "max": round(max(vals), 3),
            }
        if len(row) == 2:
            o, v = row["original"]["median"], row["villa"]["median"]
            row["ratio"] = round(v / o if name.endswith("per_s") else o / v, 2)  # > 1: villa faster
            out[name] = row
    if "stage1" in steps:  # Stage 1's late epochs against its early ones (issue 23: within 20%), per side
        out["stage1_late_over_early"] = {
            side: {
                "runs": [r["stage1"]["late_over_early"] for r in reps[side]],
                "median": statistics.median(r["stage1"]["late_over_early"] for r in reps[side]),
            }
            for side in ("original", "villa")
            if all(r["stage1"]["late_over_early"] is not None for r in reps[side])
        }
    memory = {}  # per step and side: the median over repeats of each peak (runs from before it was recorded: none)
    for step in steps:
        row = {}
        for side in ("original", "villa"):
            vals = {k: [r[step][k] for r in reps[side] if k in r[step]] for k in ("peak_rss_mb", "peak_tree_rss_mb")}
            if all(vals.values()):
                row[side] = {k: round(statistics.median(v), 1) for k, v in vals.items()}
        if len(row) == 2:
            memory[step] = row
    if memory:
        out["memory"] = memory
    return out


def format_table(res: dict) -> str:
    lines = [
        "| measure | original (median, min-max) | villa (median, min-max) | original / villa |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in res["summary"].items():
        if "ratio" not in row or name == "memory":
            continue
        unit = " regions/s" if name.endswith("per_s") else " s"
        cells = [
            f"{row[s]['median']:.2f}{unit} ({row[s]['min']:.2f}-{row[s]['max']:.2f})" for s in ("original", "villa")
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {row['ratio']:.2f}x |")
    slow = res["summary"].get("stage1_late_over_early")
    if slow:
        lines.append("")
        lines.append(
            "Stage 1, the last quarter of its epochs over the first (median): "
            + ", ".join(f"{side} {v['median']:.2f}" for side, v in slow.items())
        )
    memory = res["summary"].get("memory")
    if memory:
        lines += [
            "",
            "| step | original peak RSS (largest process / process tree) | villa peak RSS (largest process / process tree) |",
            "| --- | ---: | ---: |",
        ]
        for step, row in memory.items():
            cells = [
                f"{row[s]['peak_rss_mb']:.0f} / {row[s]['peak_tree_rss_mb']:.0f} MB" for s in ("original", "villa")
            ]
            lines.append(f"| {step} | {cells[0]} | {cells[1]} |")
    cpu = res.get("machine", {}).get("cpu")
    if cpu:
        lines += ["", f"CPU: {cpu['model']}, {cpu['logical_cores']} logical cores, native bf16: {cpu['native_bf16']}"]
    return "\n".join(lines) + "\n"


@exit_on_error
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_original",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--original", default=None, help="a checkout of github.com/StanfordMIMI/villa (required to run)")
    p.add_argument("--work", default="outputs/bench_original", help="copies, data, checkpoints and logs")
    p.add_argument("--deps", default=None, help="the original's extra packages (default: <work>/deps)")
    p.add_argument("--budget", type=int, default=15000, help="train attribute budget (the demo's)")
    p.add_argument("--target", type=int, default=16, help="target sample complexity (the demo's)")
    p.add_argument("--stage1_epochs", type=int, default=30, help="the original's and the demo's")
    p.add_argument("--stage2_epochs", type=int, default=3, help="Stage 2 epochs (no early stop in so few)")
    p.add_argument("--stage2_batch", type=int, default=64, help="the demo's (the original's config: 256)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="a prefix of the pipeline")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        default=None,
        help="print the table this script writes for an existing results.json, and run nothing",
    )
    a = p.parse_args(argv)
    if a.render:
        res = json.loads(Path(a.render).read_text())
        print(format_table({**res, "summary": summarize(res["runs"])}), end="")
        return {}
    if a.original is None:
        raise VillaError("--original is required: a checkout of the original ViLLA code to run against")
    if list(a.steps) != list(STEPS[: len(a.steps)]):
        raise VillaError(
            f"--steps {' '.join(a.steps)}: give a prefix of {' '.join(STEPS)} (each step reads the last's output)"
        )
    for flag in ("budget", "target", "stage1_epochs", "stage2_epochs", "stage2_batch", "repeats"):
        if getattr(a, flag) < 1:
            raise VillaError(f"--{flag}={getattr(a, flag)}: must be >= 1")
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    deps = Path(a.deps).resolve() if a.deps else work / "deps"
    t0 = time.perf_counter()
    files = setup(Path(a.original).resolve(), work, deps)
    sides = {s: Side(s, work, a, files, deps) for s in ("original", "villa")}
    check_original_weights(work, sides["original"].env, files)
    reps = {s: [] for s in sides}
    for rep in range(a.repeats):
        order = ("original", "villa") if rep % 2 == 0 else ("villa", "original")
        done = {s: {} for s in sides}
        for step in a.steps:
            for s in order:
                done[s][step] = sides[s].run(step, rep)
                print(f"repeat {rep + 1}/{a.repeats} {step:<10} {s:<8} {done[s][step]['seconds']:8.2f} s", flush=True)
        for s in sides:
            reps[s].append(done[s])
    summary = summarize(reps, a.steps)
    res = {
        "command": command_line("benchmarks.bench_original", argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_info(), "platform": platform.platform(), "cuda": _cuda()},
        "original_commit": _commit(Path(a.original)),
        "settings": {
            k: getattr(a, k)
            for k in ("budget", "target", "stage1_epochs", "stage2_epochs", "stage2_batch", "workers", "repeats")
        },
        "model_cfg": MODEL_CFG,
        "runs": reps,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(format_table(res))
    save(res, a.json)
    return res


def _commit(path: Path):
    r = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


if __name__ == "__main__":
    main()
