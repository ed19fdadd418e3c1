"""The typed schemas of villa's Hydra commands, and the one place their defaults are written.

Each command's YAML in configs/ lists its schema first in its defaults list (Hydra's "structured config as
schema") and holds nothing else but the groups it composes (``dataset``, ``hydra``): every key's type, default,
allowed range or choices and description is here, which is what ``--help`` prints. A key of the wrong type or a
key that does not exist fails when the config is composed, before any data or weights load. Experiment configs
(configs/experiment/) hold only what differs from these defaults.

A field's ``metadata``: ``help`` (one line), ``gt`` / ``ge`` (numeric bound), ``choices``. :func:`validate_config`
checks the bounds and choices (OmegaConf checks only types).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from villa.core.errors import VillaError


def opt(default: Any, help: str, **checks: Any) -> Any:  # noqa: A002 - the name reads well at the call sites
    """A schema field: its default, one line of help and its checks."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"
PRECISION_HELP = "auto: bf16 autocast on CUDA (fp16 without bf16), fp32 on a CPU; bf16 (CPU: opt-in); fp16; fp32"
LOGGERS = ("csv", "tensorboard", "wandb")  # villa/core/tracking.py


DEFAULT_DATA = "${paths.data_dir}/docmnist_30000_15.2"  # the paper's DocMNIST setting (budget 30000, target 16)
PER_RUN_CHECKPOINTS = "${paths.checkpoint_dir}/${task_name}/${basename:${data_dir}}"  # one folder per task and data


@dataclass
class Paths:
    data_dir: str = opt("${villa_env:data_root}", "where relative dataset names live ($VILLA_DATA_DIR, else data)")
    checkpoint_dir: str = opt(
        "${villa_env:checkpoint_root}", "where runs keep checkpoints ($VILLA_CHECKPOINT_DIR, else checkpoints)"
    )
    output_dir: str = opt("outputs", "where reports and Hydra's run folders go")


@dataclass
class Common:
    dataset: Any = opt(None, "the attribute vocabulary and prompt templates (configs/dataset/<name>.yaml or a path)")
    paths: Paths = field(default_factory=Paths)


@dataclass
class WandbOptions:
    project: str = opt("villa", "Weights & Biases project")
    entity: Optional[str] = opt(None, "Weights & Biases entity (null: your default)")
    mode: str = opt(
        "offline",
        "offline: no network, the run is kept for `wandb sync`; online; disabled",
        choices=("offline", "online", "disabled"),
    )


@dataclass
class TrainingRun(Common):
    resume: bool = opt(True, "continue <checkpoint_dir>/last.pt when it is the same run (else a one-line error)")
    seed: int = opt(23, "seed of every random draw")
    logger: list = opt(["csv"], "metrics to: csv (<checkpoint_dir>/metrics.csv, always on), tensorboard, wandb")
    wandb: WandbOptions = field(default_factory=WandbOptions)
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0: off, the original's)", ge=0)
    checkpoint_every: int = opt(1, "write last.pt every N epochs (and at the last; a resume redoes the rest)", gt=0)
    checkpoint_minutes: float = opt(
        0.0, "also write last.pt when this many minutes passed since the last (0: off)", ge=0
    )


# --- preprocessing ---------------------------------------------------------------------------------------------


@dataclass
class PreprocessModel:
    name: str = opt("RN50", "open_clip model name (RN50, villa-tiny-rn, villa-small-rn...) or auto")
    pretrained: str = opt("openai", "open_clip tag, villa-small-rn-docmnist (shipped), checkpoint path, or none")
    normalize: bool = opt(False, "CLIP mean/std on the input (the original: none)")
    input_size: Optional[int] = opt(None, "resize images to this square size first (null: native)", gt=0)


@dataclass
class PreprocessConfig(Common):
    model: PreprocessModel = field(default_factory=PreprocessModel)
    task_name: str = opt("preprocess", "names the output folder of Hydra's run record")
    data_dir: str = opt(DEFAULT_DATA, "the dataset folder (a relative name resolves under $VILLA_DATA_DIR, else data)")
    out_dir: Optional[str] = opt(None, "where the embeddings folder is written (null: <data_dir>/embeddings)")
    batch_size: int = opt(64, "images per forward pass", gt=0)
    device: str = opt("auto", DEVICE_HELP)
    num_workers: int = opt(2, "DataLoader worker processes reading images", ge=0)
    dtype: str = opt(
        "float16",
        "stored region dtype: float16 (half the disk) or float32 (the original's, exact)",
        choices=("float16", "float32"),
    )
    splits: list = opt(["train"], "splits that must be non-empty")
    seed: int = opt(0, "seeds random init when model.pretrained=none")
    progress: bool = opt(True, "tqdm progress bars")


# --- Stage 1 ----------------------------------------------------------------------------------------------------


@dataclass
class Stage1Model:
    _target_: str = opt("villa.models.MultiHeadProjection", "the mapping model class")
    one_proj: bool = opt(False, "one projection head shared by every attribute (ablation)")
    adapter: bool = opt(False, "each head as 0.2 * head(x) + 0.8 * x (ablation)")


@dataclass
class Stage1Config(TrainingRun):
    model: Stage1Model = field(default_factory=Stage1Model)
    task_name: str = opt("stage1", "names the checkpoint and output folders")
    data_dir: str = opt(DEFAULT_DATA, "the dataset folder (annotations.feather and images)")
    embeddings_dir: str = opt("${data_dir}/embeddings", "preprocessing's output for this dataset")
    mapping_path: str = opt("${data_dir}/mapping.feather", "where to write the mapping (region-attribute pairs)")
    checkpoint_dir: str = opt(PER_RUN_CHECKPOINTS, "last.pt / best.pt: one folder per task and dataset")
    device: str = opt("auto", DEVICE_HELP)
    precision: str = opt("auto", PRECISION_HELP, choices=("auto", "fp32", "bf16", "fp16"))
    epochs: int = opt(30, "training epochs (may be raised on resume)", gt=0)
    batch_size: int = opt(48, "images per batch", gt=0)
    drop_last: bool = opt(True, "drop the last partial training batch (the original's)")
    lr: float = opt(1e-4, "AdamW learning rate", gt=0)
    weight_decay: float = opt(0.01, "AdamW weight decay", ge=0)
    temperature: float = opt(0.07, "contrastive temperature", gt=0)
    original_loss: bool = opt(True, "the original's denominator (adds 1 per positive image); false: clean InfoNCE")
    sparse_backward: bool = opt(
        True, "backpropagate through each image's best region per head only (the same gradient); false: every region"
    )
    checkpoint_every: int = opt(5, "write last.pt every N epochs (and at the last; a resume redoes the rest)", gt=0)
    val_every: int = opt(5, "validation loss every N epochs (and at the last); best.pt follows it", gt=0)
    epsilon: float = opt(0.2, "assign an attribute to every region scoring > max - epsilon", ge=0)
    sentence_choice: str = opt(
        "image",
        "one caption sentence per (image, attribute) (the original's) or per (region, attribute)",
        choices=("image", "region"),
    )
    region_text: str = opt(
        "phrase",
        "each attribute's text: the phrase around it in its sentence, or the whole sentence (the original's)",
        choices=("phrase", "sentence"),
    )
    mapping_amp: bool = opt(False, "score the mapping under autocast on CUDA (bf16 flips a few decisions)")
    mapping_batch_regions: int = opt(8192, "regions scored per chunk", gt=0)
    log_every: int = opt(0, "steps between log lines inside an epoch (0: one line per epoch)", ge=0)
    progress: bool = opt(True, "tqdm progress bars")


# --- Stage 2 ----------------------------------------------------------------------------------------------------


@dataclass
class ClipModel:
    name: str = opt("RN50", "open_clip model name (RN50, villa-tiny-rn, villa-small-rn...) or auto")
    pretrained: str = opt("openai", "open_clip tag, checkpoint path, or none (random init)")
    normalize: bool = opt(False, "CLIP mean/std on the input (the original: none)")
    input_size: Optional[int] = opt(None, "resize images to this square size first (null: native)", gt=0)
    freeze_bn: bool = opt(False, "BatchNorm statistics frozen during training")
    channels_last: bool = opt(True, "channels-last memory format for the image tower (CUDA and CPU; docs/speed.md)")


@dataclass
class Scheduler:
    factor: float = opt(0.5, "ReduceLROnPlateau factor", gt=0)
    patience: int = opt(1, "epochs without improvement before the lr drops", ge=0)
    threshold: float = opt(0.005, "absolute improvement that counts", ge=0)


@dataclass
class PretrainOptions:
    crop: str = opt(
        "none",
        "objective=pretrain: the whole image (none) or its content box + a random margin (content)",
        choices=("none", "content"),
    )
    crop_margin: int = opt(28, "pixels per side, drawn per step, for crop=content", ge=0)


@dataclass
class GrainOptions:
    boxes: str = opt(
        "mapping",
        "region descriptions and boxes from Stage 1's mapping (no labels) or gold (reg_to_attr: an upper bound)",
        choices=("mapping", "gold"),
    )
    queries: int = opt(5, "region queries (GRAIN: 5), plus one image query", gt=0)
    optimizer: str = opt(
        "grain",
        "the head's optimiser: grain (its own AdamW, warm-up + cosine, GRAIN's train.py) or "
        "trainer (the tower's optimiser and schedule, at head_lr)",
        choices=("grain", "trainer"),
    )
    head_lr: Optional[float] = opt(
        None,
        "learning rate of the GRAIN head (decoder, queries, box MLP, projections); "
        "null: GRAIN's 1e-3 (optimizer=grain) or lr (trainer)",
        gt=0,
    )
    head_weight_decay: float = opt(0.1, "optimizer=grain: AdamW's decoupled decay (not on biases and norms)", ge=0)
    head_betas: list = opt([0.9, 0.98], "optimizer=grain: AdamW betas (GRAIN's)")
    warmup_epochs: float = opt(1.0, "optimizer=grain: linear warm-up from lr_start, then cosine to lr_end", ge=0)
    lr_start: float = opt(1e-6, "optimizer=grain: the warm-up's first learning rate", ge=0)
    lr_end: float = opt(1e-5, "optimizer=grain: the cosine's last learning rate (at the epoch cap)", ge=0)
    box_scale: float = opt(
        1.5, "L_box multiplier: GRAIN's compute_box_loss divides by len(weight_dict) / 3 = 2/3", ge=0
    )
    image_embedding: str = opt(
        "query",
        "L_ic's image side: GRAIN's image query, or attnpool (CLIP's attention pool on "
        "the whole-image ROI path, which then trains)",
        choices=("query", "attnpool"),
    )
    width: int = opt(256, "decoder width (a multiple of 4 and of heads)", gt=0)
    heads: int = opt(8, "decoder attention heads", gt=0)
    layers: int = opt(3, "decoder layers", gt=0)
    ffn: int = opt(1024, "decoder feed-forward width", gt=0)
    dropout: float = opt(0.1, "decoder dropout", ge=0)
    aux_loss: bool = opt(False, "box losses summed over every decoder layer (DETR's); GRAIN's code uses the last only")
    rd_weight: float = opt(1.0, "weight of L_rd (region-description alignment)", ge=0)
    l1_weight: float = opt(1.0, "weight of the box L1 loss", ge=0)
    giou_weight: float = opt(1.0, "weight of the box GIoU loss", ge=0)


@dataclass
class Stage2Config(TrainingRun):
    model: ClipModel = field(default_factory=ClipModel)
    scheduler: Scheduler = field(default_factory=Scheduler)
    grain: GrainOptions = field(default_factory=GrainOptions)
    pretrain: PretrainOptions = field(default_factory=PretrainOptions)
    task_name: str = opt("stage2", "names the checkpoint and output folders")
    objective: str = opt(
        "villa",
        "villa | one_to_one | pretrain | grain (villa/stage2/objectives/), or module.Class of your own Objective",
    )
    trust_mapping: bool = opt(
        False, "use a mapping.feather that records no provenance (another tool wrote it); recorded in the checkpoint"
    )
    data_dir: str = opt(DEFAULT_DATA, "the dataset folder (annotations.feather and images)")
    mapping_path: str = opt("${data_dir}/mapping.feather", "Stage 1's mapping.feather (objectives that read it)")
    checkpoint_dir: str = opt(PER_RUN_CHECKPOINTS, "last.pt / best.pt: one folder per task and dataset")
    device: str = opt("auto", DEVICE_HELP)
    precision: str = opt("auto", PRECISION_HELP, choices=("auto", "fp32", "bf16", "fp16"))
    epochs: int = opt(100, "maximum epochs (early stopping may end sooner; may be raised on resume)", gt=0)
    batch_size: int = opt(256, "images per step (global, split across ranks)", gt=0)
    optimizer: str = opt("adam", "adam (the original's, L2 decay) or adamw", choices=("adam", "adamw"))
    lr: float = opt(5e-5, "learning rate", gt=0)
    weight_decay: float = opt(0.2, "weight decay", ge=0)
    weight_decay_all: bool = opt(True, "decay every parameter (the original's); false: not gains, biases, temperature")
    betas: list = opt([0.9, 0.999], "Adam betas")
    eps: float = opt(1e-8, "Adam epsilon", gt=0)
    temperature: float = opt(0.07, "contrastive temperature (fixed unless learn_temperature)", gt=0)
    learn_temperature: bool = opt(False, "CLIP's learnable logit scale (pretraining)")
    early_stop_patience: int = opt(5, "stop after this many epochs without a better val loss", gt=0)
    drop_last: bool = opt(True, "drop the last partial training batch (the original's)")
    loss_average: str = opt(
        "batch", "epoch loss: mean over batches (the original's) or weighted by images", choices=("batch", "image")
    )
    log_every: int = opt(
        50, "steps between host syncs of the loss: non-finite check, progress bar (0: epoch end)", ge=0
    )
    compile: bool = opt(False, "torch.compile the image tower's region path (where the platform supports it)")
    compile_backend: str = opt("inductor", "torch.compile backend (inductor; aot_eager to check tracing quickly)")
    num_workers: int = opt(2, "DataLoader worker processes (with image_cache: the one decoding pass's)", ge=0)
    image_cache: str = opt(
        "auto",
        "decode the images once: memory, disk (memory-mapped, under the cache dir), auto (memory when they fit in a "
        "quarter of RAM), off (decode every step)",
        choices=("auto", "memory", "disk", "off"),
    )
    progress: bool = opt(True, "tqdm progress bars")


# --- evaluate ---------------------------------------------------------------------------------------------------


@dataclass
class EvalModel:
    name: str = opt("auto", "taken from a villa checkpoint; else an open_clip name (RN50, villa-small-rn...)")
    pretrained: str = opt("openai", "a checkpoint path (Stage 2 / baseline / pretrain) or an open_clip tag")
    normalize: Optional[bool] = opt(None, "null: as the checkpoint was trained (else false)")
    input_size: Optional[int] = opt(None, "null: as the checkpoint was trained (else native)", gt=0)


@dataclass
class EvaluateConfig(Common):
    model: EvalModel = field(default_factory=EvalModel)
    task_name: str = opt("evaluate", "names the output folder")
    label: str = opt("model", "the model's name in the report")
    data_dir: str = opt(DEFAULT_DATA, "the dataset folder")
    split: str = opt("test", "the held-out split to evaluate")
    readout: str = opt(
        "roi",
        "region embeddings: the image tower's ROI path (every method) or, for a objective=grain "
        "checkpoint, its region queries matched to the true boxes (query: villa's adaptation, not a GRAIN "
        "readout; docs/grain.md)",
        choices=("roi", "query"),
    )
    mapping_quality: str = opt(
        "${data_dir}/mapping_quality.json", "Stage 1's mapping_quality.json, included when present"
    )
    output: str = opt("${paths.output_dir}/evaluate/${label}.json", "where the JSON report is written")
    precision_at: list = opt([10], "k of precision@k (each at most the split's number of regions)")
    image_text: bool = opt(
        True, "also image-text retrieval, Recall@1/5/10 both ways (the only one without reg_to_attr)"
    )
    batch_size: int = opt(256, "images per batch", gt=0)
    num_workers: int = opt(2, "DataLoader worker processes", ge=0)
    device: str = opt("auto", DEVICE_HELP)


# --- zero-shot detection and classification ---------------------------------------------------------------------


@dataclass
class ZeroShotRun:
    """What every zero-shot evaluation command shares."""

    model: EvalModel = field(default_factory=EvalModel)
    paths: Paths = field(default_factory=Paths)
    label: str = opt("model", "the model's name in the report")
    output: str = opt("${paths.output_dir}/${task_name}/${label}.json", "the JSON report")
    batch_size: int = opt(64, "images per batch", gt=0)
    num_workers: int = opt(2, "DataLoader worker processes", ge=0)
    device: str = opt("auto", DEVICE_HELP)


@dataclass
class DetectionConfig(ZeroShotRun):
    task_name: str = opt("detection", "names the output folder; the detections go beside the report")
    gt: str = opt("???", "COCO-format ground truth (instances_val2017.json, LVIS's lvis_v1_val.json)")
    images: str = opt("???", "the folder its file_name entries are relative to (val2017/)")
    regions: str = opt(
        "gt", "boxes to classify: gt (the GT-box setting) or proposals (the RPN setting)", choices=("gt", "proposals")
    )
    proposals_file: Optional[str] = opt(None, "regions=proposals: COCO results JSON of boxes and objectness")
    split: Optional[str] = opt(None, "category groups scored apart: coco_48_17, lvis (rare/common/frequent) or a YAML")
    templates: Optional[list] = opt(None, "prompt templates with {} (null: CLIP's 80 ImageNet templates)")
    temperature: float = opt(0.01, "softmax temperature over the categories", gt=0)
    objectness: bool = opt(True, "regions=proposals: multiply class scores by the proposal's objectness")
    nms: float = opt(0.5, "per-class NMS IoU threshold", gt=0)
    max_dets: int = opt(100, "detections kept per image (COCO's 100)", gt=0)
    score_thresh: float = opt(1e-3, "(box, class) pairs scoring below this are dropped", ge=0)
    top_k: int = opt(1000, "regions=proposals: proposals kept per image", gt=0)


@dataclass
class ClassificationConfig(ZeroShotRun):
    task_name: str = opt("classification", "names the output folder")
    csv: str = opt("???", "CSV with an image column (image or Path) and a label column (label)")
    images: str = opt("???", "the folder the CSV's image paths are relative to")
    classes: Optional[list] = opt(None, "the class names in order (null: the labels present, sorted)")
    prompts: Optional[str] = opt(None, "YAML {class: [prompt, ...]} (null: 'a photo of {}.' templates)")
    readout: str = opt(
        "image", "image: the whole image; region: each class's best grid cell", choices=("image", "region")
    )
    grid: list = opt([1, 2, 3], "readout=region: grid levels")


# --- fine-grained -----------------------------------------------------------------------------------------------


@dataclass
class FinegrainedModel:
    name: str = opt("auto", "taken from a villa checkpoint; else an open_clip name (RN50, ViT-B-32...)")
    pretrained: str = opt("openai", "an open_clip tag, a checkpoint path (villa or open_clip), or none")


@dataclass
class FinegrainedConfig:
    paths: Paths = field(default_factory=Paths)
    task_name: str = opt("finegrained", "names the output folder")
    model: FinegrainedModel = field(default_factory=FinegrainedModel)
    benchmark: str = opt(
        "docmnist",
        "which benchmark",
        choices=(
            "winoground",
            "valse",
            "vsr",
            "svo_probes",
            "sugarcrepe",
            "aro",
            "coco_order",
            "flickr30k_order",
            "docmnist",
        ),
    )
    data_dir: str = opt(DEFAULT_DATA, "the benchmark's local folder (its published layout; docmnist: a dataset folder)")
    split: str = opt(
        "test",
        "vsr: the jsonl evaluated (a dev.jsonl beside it fits the threshold); "
        "coco_order / flickr30k_order: the Karpathy split, test or val",
    )
    valse_valid_only: bool = opt(True, "VALSE: only the samples its annotators validated (mturk.caption >= 2)")
    seed: int = opt(0, "docmnist: which regions the foils change; coco_order / flickr30k_order: the shuffles")
    spacy_model: str = opt("en_core_web_sm", "coco_order / flickr30k_order: spaCy pipeline (name or path) that tags")
    max_words: int = opt(30, "coco_order / flickr30k_order: words kept per caption (ARO's max_words)", gt=0)
    batch_size: int = opt(64, "images per batch", gt=0)
    device: str = opt("auto", DEVICE_HELP)
    output: str = opt("${paths.output_dir}/finegrained/${benchmark}.json", "where the JSON metrics are written")


@dataclass
class InspectConfig(Common):
    task_name: str = opt("inspect", "names the output folder of Hydra's run record")
    data_dir: str = opt(DEFAULT_DATA, "the dataset folder (annotations.feather and images)")
    split: Optional[str] = opt(None, "show only this split (null: every split, in file order)")
    limit: int = opt(50, "images shown (the first of the split)", gt=0)
    mapping_path: str = opt("${data_dir}/mapping.feather", "Stage 1's mapping, shown when it exists")
    out: str = opt("${data_dir}/inspect.html", "the HTML page written (self-contained: images embedded)")
    max_side: int = opt(360, "embedded images are downscaled to at most this many pixels a side", gt=0)


COMMANDS = {
    "stage1": "python -m villa.stage1",
    "stage2": "python -m villa.stage2",
    "evaluate": "python -m villa.evaluate",
    "finegrained": "python -m villa.evaluate.finegrained",
    "detection": "python -m villa.evaluate.detection",
    "classification": "python -m villa.evaluate.classification",
    "preprocess": "python -m preprocess",
    "inspect": "python -m villa.inspect",
}
SCHEMAS = {
    "preprocess": PreprocessConfig,
    "stage1": Stage1Config,
    "stage2": Stage2Config,
    "evaluate": EvaluateConfig,
    "finegrained": FinegrainedConfig,
    "detection": DetectionConfig,
    "classification": ClassificationConfig,
    "inspect": InspectConfig,
}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=schema)


def schema_keys(schema: type, prefix: str = ""):
    for f in fields(schema):
        sub = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
        if is_dataclass(sub):
            yield from schema_keys(type(sub), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


_ABSENT = object()


def validate_config(cfg: DictConfig, name: str) -> None:
    """Check the bounds and choices of ``cfg`` against the schema ``name``; the first violation is one line.

    Also: no key outside the schema (``+batchsize=4`` would be stored and ignored), and the checks that involve
    list items or two keys (``precision_at``, ``betas``, ``crop`` outside pretraining)."""
    from omegaconf import OmegaConf

    known = {k for k, _ in schema_keys(SCHEMAS[name])}
    groups = {k.split(".")[0] for k in known}
    for key in cfg:
        if key in ("hydra", "dataset"):
            continue
        if key not in groups:
            raise VillaError(f"unknown key {key!r} (not a {name} setting); see {COMMANDS[name]} --help")
        node = cfg[key]
        if OmegaConf.is_dict(node):
            for sub in node:
                if f"{key}.{sub}" not in known and not any(k.startswith(f"{key}.{sub}.") for k in known):
                    raise VillaError(f"unknown key '{key}.{sub}' (not a {name} setting); see {COMMANDS[name]} --help")
    missing = [k for k in known if k != "dataset" and OmegaConf.select(cfg, k, default=_ABSENT) is _ABSENT]
    if missing:
        raise VillaError(
            f"{missing[0]} is missing (deleted with ~{missing[0]}?): every {name} setting needs a value; "
            f"set it with {missing[0]}=... instead"
        )
    target = OmegaConf.select(cfg, "model._target_", default=None)
    if target is not None and target != "villa.models.MultiHeadProjection":  # villa's own: nothing to import
        import importlib

        try:
            module, _, attr = str(target).rpartition(".")
            if not isinstance(getattr(importlib.import_module(module), attr), type):
                raise TypeError(attr)
        except Exception as e:  # not importable, not a class
            raise VillaError(
                f"model._target_={target!r} is not a class villa can import ({type(e).__name__}); use "
                "villa.models.MultiHeadProjection or your own importable class"
            ) from None
    for key, f in schema_keys(SCHEMAS[name]):
        meta = f.metadata
        if not any(k in meta for k in ("gt", "ge", "choices")):
            continue
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if "gt" in meta and not value > meta["gt"]:
            raise VillaError(f"{key}={value}: must be > {meta['gt']} ({meta['help']})")
        if "ge" in meta and not value >= meta["ge"]:
            raise VillaError(f"{key}={value}: must be >= {meta['ge']} ({meta['help']})")
        if "choices" in meta and value not in meta["choices"]:
            raise VillaError(f"{key}={value!r}: use one of {', '.join(meta['choices'])} ({meta['help']})")
    if name in ("stage1", "stage2"):
        bad = [x for x in cfg.logger if x not in LOGGERS]
        if bad:
            raise VillaError(
                f"logger={list(cfg.logger)}: {bad[0]!r} is not a logger; use a list of {', '.join(LOGGERS)}"
            )
    if name == "evaluate" and not all(isinstance(k, int) and k >= 1 for k in cfg.precision_at):
        raise VillaError(f"precision_at={list(cfg.precision_at)}: each k must be an integer >= 1")
    if name == "stage2":
        for key in ("betas", "grain.head_betas"):
            betas = list(OmegaConf.select(cfg, key))
            if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
                raise VillaError(f"{key}={betas}: two numbers in [0, 1), e.g. [0.9, 0.999]")
        if cfg.pretrain.crop != "none" and cfg.objective != "pretrain":
            raise VillaError(
                f"pretrain.crop={cfg.pretrain.crop} is for objective=pretrain only (objective="
                f"{cfg.objective} trains on whole images and boxes); remove it"
            )
        from villa.stage2.objectives import BUILTIN, objective_class

        if cfg.objective not in BUILTIN:  # your own: importable, a subclass of Objective
            objective_class(cfg.objective)


def check_inputs(cfg: DictConfig, name: str) -> None:
    """The folders and files a command reads exist, before anything is created (a checkpoint folder, Hydra's run
    folder): a missing input is one line, and the command leaves nothing behind."""
    from pathlib import Path

    from villa.core.env import resolve_data_dir

    if name not in ("preprocess", "stage1", "stage2", "evaluate", "inspect"):
        return
    from villa.data.vocab import vocab_from_config

    vocab_from_config(cfg)  # the dataset config reads
    data = resolve_data_dir(cfg.data_dir) if name == "preprocess" else Path(cfg.data_dir)
    if not data.is_dir():
        raise VillaError(f"dataset folder not found: {data}; generate it or pass the right data_dir")
    if not (data / "annotations.feather").is_file():
        raise VillaError(
            f"{data / 'annotations.feather'} not found; a dataset folder needs annotations.feather "
            "(docs/data_format.md)"
        )
    if name == "stage1" and not Path(cfg.embeddings_dir).is_dir():
        raise VillaError(
            f"embeddings folder not found: {cfg.embeddings_dir}; run preprocessing first (python -m preprocess "
            f"data_dir={cfg.data_dir}) or set embeddings_dir"
        )
    reads_mapping = name == "stage2" and (
        cfg.objective == "villa" or (cfg.objective == "grain" and cfg.grain.boxes == "mapping")
    )
    if reads_mapping and not Path(cfg.mapping_path).is_file():
        raise VillaError(
            f"mapping not found: {cfg.mapping_path}; run Stage 1 first (python -m villa.stage1 ...) or set mapping_path"
        )


def help_text(name: str, doc: str, cfg: Optional[DictConfig] = None) -> str:
    """``--help``: the command's description, then each key with its type, current default and description."""
    from omegaconf import OmegaConf

    experiments = "; experiment=<name> loads configs/experiment/<name>.yaml" if name in ("stage1", "stage2") else ""
    lines = [doc.strip(), "", f"Keys (override as key=value; -m key=a,b sweeps{experiments}):"]
    for key, f in schema_keys(SCHEMAS[name]):
        if key == "dataset":
            lines.append(f"  {key:<24} {f.metadata['help']}")
            continue
        default = OmegaConf.select(cfg, key, throw_on_missing=False) if cfg is not None else None
        try:
            shown = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
        except Exception:  # an interpolation that cannot resolve here
            shown = "?"
        typ = getattr(f.type, "__name__", str(f.type)).replace("typing.", "")
        extra = f" [{'|'.join(f.metadata['choices'])}]" if "choices" in f.metadata else ""
        lines.append(f"  {key:<24} {f.metadata.get('help', '')}{extra} ({typ}; default {shown})")
    from villa.core.env import env_help

    lines += ["", "Environment variables (villa/core/env.py):", env_help()]
    return "\n".join(lines)
