"""The whole ViLLA pipeline on one DocMNIST setting, from a starting encoder: the demo and the complexity
experiment both run through :func:`run_pipeline`.

generate -> preprocess (starting encoder) -> Stage 1 -> Stage 2 ViLLA and the one-to-one baseline (both from the
starting encoder) -> evaluate zero-shot / baseline / ViLLA on the same held-out regions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from docmnist.generate_docmnist import generate
from villa.core.config import compose_config
from villa.core.errors import VillaError
from villa.core.io import write_json_atomic
from villa.core.provenance import check_held_out, checkpoint_pools, dataset_pools
from villa.core.runtime import get_runtime, machine_info
from villa.data.annotations import load_annotations
from villa.data.vocab import load_vocab
from villa.evaluate.retrieval import evaluate_model, region_options
from villa.models.clip import create_clip
from villa.preprocess import embed_dataset
from villa.stage1.mapping import write_oracle_mapping
from villa.stage1.train import train_stage1
from villa.stage2.train import train_stage2

log = logging.getLogger(__name__)


@dataclass
class PipelineSettings:
    """What one run of the pipeline does; defaults are the CPU demo's."""

    model: str = "auto"  # "auto": the model recorded in the starting checkpoint
    pretrained: str = "none"  # the starting encoder: a checkpoint path or an open_clip tag
    input_size: Optional[int] = 168
    target: int = 16
    budget: int = 15000
    val_budget: int = 3000
    test_budget: int = 3000
    seed: int = 23
    stage1_epochs: int = 30
    stage1_lr: float = 1e-3
    stage2_epochs: int = 6
    stage2_batch: int = 64
    stage2_lr: float = 2e-4
    early_stop_patience: int = 3  # Stage 2: epochs without a better val loss; ``stage2_epochs`` is the cap
    train_images: Optional[int] = None  # the fixed-images control: this many train images instead of ``budget``
    val_images: Optional[int] = None
    grain_queries: int = 9  # objective=grain: one region query per DocMNIST grid cell
    grain_head_lr: Optional[float] = None  # objective=grain: the head's learning rate (None: stage2_lr)
    device: str = "auto"
    num_workers: int = 2
    progress: bool = True

    @classmethod
    def demo(cls, budget: int, stage1_epochs: int, stage2_epochs: int, **kw: Any) -> PipelineSettings:
        """The demo's settings at ``budget`` training pairs: val and test budgets a fifth of it each."""
        fifth = max(1, budget // 5)
        return cls(
            budget=budget,
            val_budget=fifth,
            test_budget=fifth,
            stage1_epochs=stage1_epochs,
            stage2_epochs=stage2_epochs,
            **kw,
        )

    def generate(self, out_dir: Path) -> Path:
        """This run's DocMNIST (its budgets, or the fixed-images control's image counts) in ``out_dir``."""
        return generate(
            self.budget,
            self.target,
            seed=self.seed,
            out_dir=str(out_dir),
            val_budget=self.val_budget,
            test_budget=self.test_budget,
            overwrite=True,
            progress=self.progress,
            train_images=self.train_images,
            val_images=self.val_images,
        )

    def check(self) -> None:
        """Every setting in range before any work (the demo's and the experiments' flags have these names)."""
        for name in (
            "target",
            "budget",
            "val_budget",
            "test_budget",
            "stage1_epochs",
            "stage2_epochs",
            "stage2_batch",
            "early_stop_patience",
            "grain_queries",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise VillaError(f"--{name}={v}: must be an integer >= 1")
        for name in ("stage1_lr", "stage2_lr"):
            if not getattr(self, name) > 0:
                raise VillaError(f"--{name}={getattr(self, name)}: must be > 0")
        if self.grain_head_lr is not None and not self.grain_head_lr > 0:
            raise VillaError(f"--grain_head_lr={self.grain_head_lr}: must be > 0")
        if self.input_size is not None and self.input_size < 1:
            raise VillaError(f"--input_size={self.input_size}: must be >= 1 (or 0 for the native size)")
        for name in ("train_images", "val_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise VillaError(f"--{name}={getattr(self, name)}: must be >= 1")
        if self.num_workers < 0:
            raise VillaError(f"--num_workers={self.num_workers}: must be >= 0")
        for name in ("budget", "val_budget", "test_budget"):
            if getattr(self, name) < 2 * self.target:
                raise VillaError(
                    f"--{name}={getattr(self, name)} is below two images at --target={self.target}; raise it"
                )


def stage2_overrides(s: PipelineSettings, data: Path, ckpt: Path, objective: str, mapping: Optional[Path]) -> list[str]:
    over = [
        f"objective={objective}",
        f"data_dir={data}",
        f"checkpoint_dir={ckpt}",
        "resume=false",
        f"model.name={s.model}",
        f"model.pretrained={s.pretrained}",
        f"epochs={s.stage2_epochs}",
        f"batch_size={s.stage2_batch}",
        f"lr={s.stage2_lr}",
        f"device={s.device}",
        f"num_workers={s.num_workers}",
        f"progress={str(s.progress).lower()}",
        f"seed={s.seed}",
        f"early_stop_patience={s.early_stop_patience}",
    ]
    if s.input_size:
        over.append(f"model.input_size={s.input_size}")
    if mapping is not None:
        over.append(f"mapping_path={mapping}")
    return over


METHODS = ("villa", "baseline", "oracle", "grain")  # Stage 2 trainings; "zero-shot" is the starting encoder itself
READOUTS = {"grain": ("roi", "query")}  # evaluated twice: the ROI path, and as "grain-queries" the matched queries


def run_pipeline(
    s: PipelineSettings,
    work: Path,
    eval_data: Optional[Path] = None,
    methods: Sequence[str] = ("villa", "baseline"),
    zero_shot: bool = True,
) -> dict[str, Any]:
    """Run every step under ``work``; evaluate on ``eval_data``'s test split (default: this dataset's).

    ``methods``: the Stage 2 models trained from the starting encoder: ``villa`` (Stage 1's mapping), ``baseline``
    (one-to-one), ``oracle`` (ViLLA's Stage 2 on the ground-truth region-attribute pairs: the ablation) and
    ``grain`` (the GRAIN-style objective on Stage 1's mapping, ``grain.boxes=mapping``).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise VillaError(f"unknown method(s) {unknown}: use {', '.join(METHODS)}")
    s.check()
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def tick(name: str, t: float) -> None:
        timings[name] = round(time.perf_counter() - t, 1)
        log.info("[%s] done in %.1fs", name, timings[name])

    t = time.perf_counter()
    data = s.generate(work / "data")
    tick("docmnist", t)
    eval_root = eval_data or data
    # refuse before any training: the evaluation digits must be new to everything that trains in this run
    held_out = check_held_out(
        eval_root,
        {
            f"this run's training data ({data.name}, train and val splits)": dataset_pools(data, ("train", "val")),
            f"the starting encoder {s.pretrained}": checkpoint_pools(s.pretrained),
        },
    )
    t = time.perf_counter()
    emb = embed_dataset(
        data,
        "docmnist",
        model=s.model,
        pretrained=s.pretrained,
        device=s.device,
        num_workers=s.num_workers,
        input_size=s.input_size,
        progress=s.progress,
        out_dir=data / "embeddings",
    )
    tick("preprocess", t)
    t = time.perf_counter()
    mapping = data / "mapping.feather"
    s1 = train_stage1(
        compose_config(
            "stage1",
            [
                f"data_dir={data}",
                f"embeddings_dir={emb}",
                f"mapping_path={mapping}",
                f"checkpoint_dir={work / 'ckpt' / 'stage1'}",
                "resume=false",
                f"epochs={s.stage1_epochs}",
                f"lr={s.stage1_lr}",
                f"device={s.device}",
                f"seed={s.seed}",
                f"progress={str(s.progress).lower()}",
            ],
        )
    )
    tick("stage1", t)
    vocab = load_vocab("docmnist")
    if "oracle" in methods:
        write_oracle_mapping(data, vocab, data / "oracle_mapping.feather", seed=s.seed)
    results: dict[str, Any] = {
        "settings": asdict(s),
        "data": str(data),
        "mapping": s1.get("quality"),
        "held_out": held_out,
    }
    ckpts = {}
    for method in methods:
        t = time.perf_counter()
        ck = work / "ckpt" / method
        objective = {"baseline": "one_to_one", "grain": "grain"}.get(method, "villa")
        pairs = {"villa": mapping, "oracle": data / "oracle_mapping.feather", "grain": mapping}.get(method)
        extra = (
            [f"grain.queries={s.grain_queries}", f"grain.head_lr={s.grain_head_lr or 'null'}"]
            if method == "grain"
            else []
        )
        r = train_stage2(compose_config("stage2", stage2_overrides(s, data, ck, objective, pairs) + extra))
        ckpts[method] = Path(r["best_checkpoint"])
        results[f"{method}_training"] = {"best_val": r["best_val"], "epochs": r["epochs_run"]}
        tick(f"stage2_{method}", t)
    t = time.perf_counter()
    ann = load_annotations(eval_root, vocab, required_splits=("test",))
    runtime = get_runtime(s.device)
    retrieval = {}
    models = ([("zero-shot", s.pretrained)] if zero_shot else []) + [(m, str(c)) for m, c in ckpts.items()]
    for label, pretrained in models:
        clip = create_clip(s.model, pretrained, device=runtime.device)
        opts = region_options(clip.pretrained, None, s.input_size)
        for readout in READOUTS.get(label, ("roi",)):
            name = label if readout == "roi" else f"{label}-queries"
            retrieval[name] = evaluate_model(
                clip, ann, vocab, "test", runtime, opts, num_workers=s.num_workers, readout=readout
            )
    tick("evaluate", t)
    results.update(
        {
            "retrieval": retrieval,
            "eval_data": str(eval_root),
            "checkpoints": {k: str(v) for k, v in ckpts.items()},
            "timings": timings,
            "seconds": round(time.perf_counter() - t0, 1),
            "machine": machine_info(),
        }
    )
    write_json_atomic(work / "results.json", results)
    return results
