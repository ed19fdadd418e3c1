"""CLIP encoders through open_clip's factory, and the region path of ViLLA's image tower.

- :func:`create_clip` builds any open_clip model by name, with ``pretrained`` an open_clip tag (``openai``),
  a local checkpoint path (open_clip's or one villa wrote), or none (random init, with one warning).
- villa's small configs (``villa-tiny-rn``, ``villa-small-rn``: the RN50 structure with fewer and narrower
  layers) are registered with open_clip on import, so tests and the CPU demo run the same code path as RN50.
- :class:`RegionEncoder` embeds boxes: backbone to the third stage over whole images, one ROI-Align over all
  boxes of the batch, then the last stage and the attention pool (the original's path, batched).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from torch import nn
from torchvision.ops import roi_align

from villa.errors import VillaError
from villa.paths import atomic_file
from villa.runtime import Runtime
from villa.training import load_checkpoint

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NO_WEIGHTS = (None, "", "none", "None", "random")
DEFAULT_MODEL = "RN50"  # what model=auto means without a villa checkpoint (the paper's encoder)
_warned_random: set[str] = set()


@dataclass
class Clip:
    """An open_clip model with what describes it: name, weights source and embedding size."""

    model: nn.Module
    model_name: str
    pretrained: Optional[str]
    embed_dim: int
    model_cfg: dict
    villa_checkpoint: bool = False  # weights from a villa checkpoint (trained through the region path)

    @property
    def quick_gelu(self) -> bool:
        return bool(self.model_cfg.get("quick_gelu", False))

    @property
    def source(self) -> dict[str, Any]:
        """What identifies these weights, recorded next to every embedding file."""
        return {
            "model": self.model_name,
            "pretrained": self.pretrained or "none",
            "embed_dim": self.embed_dim,
            "quick_gelu": self.quick_gelu,
        }


def _register_config(name: str, cfg: dict) -> str:
    """Make a model config recorded in a checkpoint known to open_clip; return the name to build it by.

    The checkpoint's config wins: if ``name`` is registered with a different config (a config file changed since
    the checkpoint was written), it is registered as ``name@<hash>``.
    """
    known = open_clip.get_model_config(name)
    if known is not None and json.dumps(known, sort_keys=True) == json.dumps(cfg, sort_keys=True):
        return name
    if known is not None:
        name = f"{name}@{hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]}"
        if open_clip.get_model_config(name) is not None:
            return name
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(Path(d) / f"{name}.json")
    return name


@contextlib.contextmanager
def _quiet_root(prefix: str):
    """Drop open_clip's own root-logger message starting with ``prefix`` while the block runs."""
    root = logging.getLogger()
    filt = _PrefixFilter(prefix)
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


class _PrefixFilter(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def resolve_model_name(model_name: Optional[str], checkpoint: Optional[dict] = None) -> str:
    """``auto`` (or empty) means: the model a villa checkpoint records, else RN50 (the paper's encoder)."""
    if checkpoint is not None:
        return checkpoint["model_name"]
    if model_name in (None, "", "auto"):
        return DEFAULT_MODEL
    return model_name


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a download can even start (a DNS failure answers at once); respects HF_HUB_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_tag_weights(pcfg: dict, cache_dir: Optional[str]) -> Optional[str]:
    """The local file of a pretrained tag when it is already downloaded (no network), else None.

    Looks where open_clip's own download would put it: the Hugging Face cache (``hf_hub``) or open_clip's URL cache.
    """
    if pcfg.get("file"):
        return pcfg["file"] if os.path.isfile(pcfg["file"]) else None
    hub = pcfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import hf_hub_download

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            try:
                return hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=True)
            except Exception:  # not in the cache (LocalEntryNotFoundError and friends)
                continue
    url = pcfg.get("url", "")
    if url:
        target = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        if target.is_file():
            return str(target)
    return None


def _create_from_tag(
    model_name: str, tag: str, device: Union[str, torch.device], precision: str, cache_dir: Optional[str]
) -> nn.Module:
    """open_clip weights by tag, with the activation the weights were trained with.

    open_clip 3.x builds RN50's text tower with GELU and only warns when the ``openai`` weights need QuickGELU (open_clip
    issue #771); every tag whose pretrained config says ``quick_gelu`` is built with ``force_quick_gelu=True`` here.
    Weights already in the cache load without network; when they are missing and no network is reachable, this fails
    at once (instead of open_clip's minute of retries) with the way out.
    """
    pcfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not pcfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise VillaError(
            f"pretrained={tag!r} is neither a file nor a tag of {model_name} (its tags: {tags}); "
            "pass a tag, a checkpoint path or none"
        )
    quick = bool(pcfg.get("quick_gelu", False))
    local = cached_tag_weights(pcfg, cache_dir)
    if local is None and not _network_reachable():
        raise VillaError(
            f"pretrained={tag!r} for {model_name} is not downloaded and no network is reachable; "
            "pass a local checkpoint path (model.pretrained=/path/to/weights) or pretrained=none"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="QuickGELU mismatch")  # we force the tag's activation
            return open_clip.create_model(
                model_name, pretrained=local or tag, precision=precision, device=device,
                force_quick_gelu=quick, cache_dir=cache_dir,
            )  # fmt: skip
    except Exception as e:  # open_clip raises RuntimeError / OSError / hub errors
        raise VillaError(
            f"could not load pretrained={tag!r} for {model_name} ({type(e).__name__}: {str(e)[:120]}); "
            "offline, pass a local checkpoint path or pretrained=none"
        ) from e


def _create_from_file(model_name: str, path: Path, device: Union[str, torch.device], precision: str) -> nn.Module:
    """An open_clip-format checkpoint file (a state dict, or OpenAI's TorchScript archive) loaded by open_clip."""
    try:
        return open_clip.create_model(model_name, pretrained=str(path), precision=precision, device=device)
    except Exception as e:  # corrupt archive, wrong keys or shapes: all one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise VillaError(
            f"cannot load {path} as {model_name} weights ({reason}); pass a checkpoint of that model "
            "(model.name=<its open_clip name>), a villa checkpoint, a tag or none"
        ) from e


def is_villa_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == "villa-clip" and "state_dict" in obj


def create_clip(
    model_name: str = "RN50",
    pretrained: Optional[str] = "openai",
    device: Union[str, torch.device] = "cpu",
    precision: str = "fp32",
    cache_dir: Optional[str] = None,
) -> Clip:
    """Build a CLIP model with open_clip's factory.

    ``model_name``: an open_clip config name, or ``auto`` (the model a villa checkpoint records, else RN50).
    ``pretrained``: an open_clip tag (``openai``; QuickGELU where the tag needs it), a local checkpoint path
    (open_clip's format, or a checkpoint written by villa's ``pretrain`` mode / Stage 2), or none for random init
    (warned once per model). ``cache_dir``: where tagged weights are downloaded (open_clip's argument).
    """
    ckpt, path = None, None
    if pretrained not in NO_WEIGHTS and (os.sep in str(pretrained) or os.path.exists(str(pretrained))):
        path = Path(str(pretrained))
        if path.is_dir() and (path / "open_clip_config.json").is_file():
            obj = read_open_clip_folder(path)  # villa.export --format open_clip
        elif not path.is_file():
            raise VillaError(f"pretrained checkpoint not found: {path}; pass an existing file, a tag or none")
        else:
            try:
                obj = load_checkpoint(path, "pretrained checkpoint")
            except VillaError:
                obj = {}  # perhaps a format only open_clip reads (TorchScript); it decides below, with one line
        kind = str(obj.get("kind", ""))
        if not is_villa_checkpoint(obj) and kind.startswith("villa-"):
            raise VillaError(
                f"{path} is a {kind} checkpoint, not a CLIP model; pass a Stage 2 or pretraining checkpoint "
                "(<checkpoint_dir>/best.pt), an open_clip checkpoint, a tag or none"
            )
        if is_villa_checkpoint(obj):
            ckpt = obj
            saved = obj["model_name"]
            if model_name not in (saved, None, "", "auto") and model_name.split("@")[0] != saved.split("@")[0]:
                raise VillaError(
                    f"checkpoint {path} holds a {saved!r} model but the model name is {model_name!r}; set model.name={saved} "
                    "(or model.name=auto)"
                )
            model_name = _register_config(saved, obj["model_cfg"])
    if ckpt is None:
        model_name = resolve_model_name(model_name)
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        known = ", ".join(sorted(open_clip.list_models())[:8])
        raise VillaError(f"unknown model {model_name!r}: use an open_clip name (e.g. {known}, ...) or villa-tiny-rn")
    if pretrained in NO_WEIGHTS:
        if model_name not in _warned_random:
            log.warning(
                "%s: no pretrained weights (pretrained=none): random init, results will not match the paper; "
                "pass pretrained=openai or a checkpoint path",
                model_name,
            )
            _warned_random.add(model_name)
        with _quiet_root("No pretrained weights loaded"):  # ours above is the one warning
            model = open_clip.create_model(model_name, pretrained=None, precision=precision, device=device)
        pretrained = None
    elif ckpt is not None:
        with _quiet_root("No pretrained weights loaded"):  # weights come from the checkpoint just below
            model = open_clip.create_model(model_name, pretrained=None, precision=precision, device="cpu")
        model.load_state_dict(ckpt["state_dict"], strict=True)
        model = model.to(device)
    elif path is not None:
        model = _create_from_file(model_name, path, device, precision)
    else:
        model = _create_from_tag(model_name, str(pretrained), device, precision, cache_dir)
        if open_clip.get_pretrained_cfg(model_name, str(pretrained)).get("quick_gelu"):
            cfg = {**cfg, "quick_gelu": True}
    model.eval()
    if isinstance(getattr(model, "visual", None), ModifiedResNet):
        class_token_pool(model.visual)
    return Clip(
        model, model_name, None if pretrained is None else str(pretrained), int(cfg["embed_dim"]), cfg, ckpt is not None
    )


def read_open_clip_folder(folder: Path) -> dict[str, Any]:
    """A folder written by ``python -m villa.export --format open_clip`` as a villa-clip checkpoint dict (its weights,
    model config and, under ``config.model``, the region-path options it recorded)."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / "open_clip_config.json").read_text())
        weights = load_file(str(folder / "open_clip_model.safetensors"))
    except (OSError, ValueError) as e:
        raise VillaError(f"{folder} is not an open_clip folder villa can read ({type(e).__name__}: {e}); export it "
                         "again with python -m villa.export --format open_clip") from None  # fmt: skip
    v = meta.get("villa") or {}
    return {"format": "villa-clip", "model_name": v.get("model_name") or folder.name, "model_cfg": meta["model_cfg"],
            "state_dict": weights, "kind": v.get("kind"), "config": {"model": v.get("region_options") or {}}}  # fmt: skip


def clip_checkpoint_state(clip_model: nn.Module, model_name: str, model_cfg: dict, **extra: Any) -> dict[str, Any]:
    """The self-describing ``villa-clip`` checkpoint dict that :func:`create_clip` loads as ``pretrained=<path>``
    (write it with :func:`villa.training.save_checkpoint`). ``extra``: training state, config, history..."""
    return {
        "format": "villa-clip",
        "model_name": model_name,
        "model_cfg": model_cfg,
        "state_dict": clip_model.state_dict(),
        **extra,
    }


class ClassTokenAttentionPool2d(AttentionPool2d):
    """open_clip's ``AttentionPool2d`` computing only the output it returns: the attention of the mean (class)
    token's query, as OpenAI's CLIP code and the original ViLLA code compute it (``query=x[:1]``). open_clip projects
    and attends a query at every position and keeps the first; the result is the same to float rounding (tested),
    for a fraction of the pool's work (the region path runs the pool once per region)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training, need_weights=False,
        )  # fmt: skip
        return out.squeeze(0)


def class_token_pool(visual: ModifiedResNet) -> ModifiedResNet:
    """Give ``visual``'s attention pool :class:`ClassTokenAttentionPool2d`'s forward, in place (the same parameters
    and state dict: only the class changes, so copies and pickles keep it)."""
    if type(visual.attnpool) is AttentionPool2d:
        visual.attnpool.__class__ = ClassTokenAttentionPool2d
    return visual


class RegionEncoder(nn.Module):
    """ViLLA's region path on an open_clip ModifiedResNet (RN50 and villa's small configs).

    Images (B, 3, H, W) in [0, 1] -> stem, layer1..layer3 -> ROI-Align of every box (output
    ``2 * attnpool grid``, 14x14 for RN50; spatial scale = feature width / image width; sampling ratio 0;
    aligned) -> layer4 -> attention pool -> (K, D) region embeddings (not normalised).
    """

    def __init__(self, visual: nn.Module, normalize: bool = False, input_size: Optional[int] = None):
        super().__init__()
        if not isinstance(visual, ModifiedResNet):
            raise VillaError(
                f"the region path needs a ModifiedResNet image tower (RN50, villa-tiny-rn...), got {type(visual).__name__}"
            )
        self.visual = class_token_pool(visual)
        grid = int(round((visual.attnpool.positional_embedding.shape[0] - 1) ** 0.5))
        self.roi_size = 2 * grid
        self.normalize = normalize
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.visual.output_dim

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = images.to(v.conv1.weight.dtype)
        return v.layer3(v.layer2(v.layer1(v.stem(x))))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The region path's input: CLIP's mean/std when ``normalize``, resized to ``input_size`` when set."""
        if self.normalize:
            images = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        h, w = images.shape[-2:]
        if self.input_size is not None and (h, w) != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        return images

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, box_image: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) float in [0, 1]; boxes (K, 4) [x0, y0, x1, y1] in pixels; box_image (K,) long."""
        h, w = images.shape[-2:]
        images = self.prepare(images)
        if images.shape[-1] != w:
            boxes = boxes * boxes.new_tensor([images.shape[-1] / w, images.shape[-2] / h] * 2)
            w = images.shape[-1]
        feat = self.trunk(images)
        x = roi_features(feat, boxes, box_image, self.roi_size, feat.shape[-1] / w)
        x = self.visual.layer4(x)
        return self.visual.attnpool(x)


def roi_features(
    feat: torch.Tensor, boxes: torch.Tensor, box_image: torch.Tensor, output_size: int, spatial_scale: float
) -> torch.Tensor:
    """ROI-Align of ``boxes`` (K, 4) on ``feat`` (B, C, h, w) -> (K, C, s, s) in ``feat``'s dtype.

    The boxes stay fp32 whatever ``feat``'s dtype: under bf16 autocast a pixel coordinate such as 150.7 would become
    151 (bf16 keeps 8 significant bits). The features are upcast for the interpolation, as torchvision's own autocast
    wrapper of roi_align does on CUDA, and the result is cast back.
    """
    rois = torch.cat([box_image[:, None].to(torch.float32), boxes.to(torch.float32)], dim=1)
    x = roi_align(
        feat.float(), rois, output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=0, aligned=True
    )
    return x.to(feat.dtype)


@torch.no_grad()
def encode_texts(
    clip: Clip, texts: Sequence[str], runtime: Runtime, batch_size: int = 1024, normalize: bool = True
) -> torch.Tensor:
    """Text embeddings (N, D) float32 on CPU, in large batches."""
    tokenizer = open_clip.get_tokenizer(clip.model_name)
    out = []
    for s in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[s : s + batch_size])).to(runtime.device)
        with runtime.autocast():
            z = clip.model.encode_text(tokens)
        z = z.float()
        out.append(F.normalize(z, dim=-1) if normalize else z)
    if not out:
        return torch.zeros(0, clip.embed_dim)
    return torch.cat(out).cpu()


def encode_attributes(clip: Clip, vocab, runtime: Runtime) -> torch.Tensor:
    """Each attribute's embedding: its prompts' text embeddings, averaged, then L2-normalised (the original's).

    (A, D) float32 in vocabulary order; all prompts go through the text encoder in one batch.
    """
    prompts = [p for a in vocab.attributes for p in vocab.prompts(a)]
    counts = torch.tensor([len(vocab.prompts(a)) for a in vocab.attributes])
    z = encode_texts(clip, prompts, runtime, normalize=False)
    owner = torch.repeat_interleave(torch.arange(len(vocab)), counts)
    mean = torch.zeros(len(vocab), z.shape[1]).index_add_(0, owner, z) / counts[:, None]
    return F.normalize(mean, dim=-1)


def text_tower_digest(clip: Clip) -> str:
    """What a text embedding depends on: the model name and every text-tower tensor (all weights and buffers
    outside ``visual``), hashed. Two random inits, or one model before and after training, never share it."""
    h = hashlib.sha256(clip.model_name.encode())
    for k, v in clip.model.state_dict().items():
        if k.startswith("visual.") or k == "logit_scale":
            continue
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def embed_sentences_cached(
    clip: Clip, sentences: Sequence[str], runtime: Runtime, cache_dir: Optional[Path] = None, batch_size: int = 1024
) -> torch.Tensor:
    """Normalised text embeddings (S, D) of unique ``sentences``, each embedded once.

    With ``cache_dir``, embeddings persist across runs in one file per text tower (named by
    :func:`text_tower_digest`, so nothing the values depend on is left out of the key); only sentences missing from
    it are embedded. A cache file that cannot be read is rebuilt (with a warning), never an error.
    """
    cache_path = Path(cache_dir) / f"{clip.model_name}-{text_tower_digest(clip)}.pt" if cache_dir is not None else None
    cached: dict[str, int] = {}
    emb = torch.zeros(0, clip.embed_dim)
    if cache_path is not None and cache_path.is_file():
        try:
            obj = torch.load(cache_path, map_location="cpu", weights_only=True)
            cached = {s: i for i, s in enumerate(obj["sentences"])}
            emb = obj["embeddings"]
            if emb.shape != (len(cached), clip.embed_dim):
                raise ValueError(f"shape {tuple(emb.shape)}")
        except Exception as e:  # corrupt, truncated or foreign: rebuild
            log.warning("text cache %s cannot be read (%s): rebuilding it", cache_path, type(e).__name__)
            cached, emb = {}, torch.zeros(0, clip.embed_dim)
    missing = [s for s in dict.fromkeys(sentences) if s not in cached]
    if missing:
        new = encode_texts(clip, missing, runtime, batch_size=batch_size)
        start = len(cached)
        cached.update({s: start + i for i, s in enumerate(missing)})
        emb = torch.cat([emb, new])
        if cache_path is not None:
            with atomic_file(cache_path) as tmp:
                torch.save({"encoder": clip.model_name, "sentences": list(cached), "embeddings": emb}, tmp)
    return emb[torch.tensor([cached[s] for s in sentences], dtype=torch.long)] if sentences else emb[:0]


def mean_text_embeddings(
    clip: Clip, texts: Sequence[str], runtime: Runtime, cache_dir: Optional[Path] = None
) -> torch.Tensor:
    """A text's embedding = its sentences' (split on ".") embeddings, averaged, L2-normalised. (N, D) float32.

    All unique sentences are embedded once, in large batches (and cached); never per item.
    """
    from villa.vocab import split_sentences

    sents = [split_sentences(t) for t in texts]
    counts = torch.tensor([len(s) for s in sents])
    if (counts == 0).any():
        i = int(torch.nonzero(counts == 0)[0])
        raise VillaError(f"text #{i} ({texts[i]!r}) has no sentence; every pair needs text")
    uniq = list(dict.fromkeys(s for ss in sents for s in ss))
    pos = {s: i for i, s in enumerate(uniq)}
    u_emb = embed_sentences_cached(clip, uniq, runtime, cache_dir)
    flat = torch.tensor([pos[s] for ss in sents for s in ss], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(texts)), counts)
    total = torch.zeros(len(texts), u_emb.shape[1]).index_add_(0, owner, u_emb[flat])
    return F.normalize(total / counts[:, None], dim=-1)


@torch.no_grad()
def calibrate_batchnorm(encoder: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]], max_batches: int = 10) -> int:
    """Estimate BatchNorm running statistics from data (cumulative average over up to ``max_batches``).

    Only for randomly initialised encoders: their running statistics start at mean 0 / variance 1, so in eval mode
    every image maps to nearly the same embedding (cosine ~1.0) until hundreds of training steps have decayed the
    initial variance (momentum 0.1: 0.9^n). Pretrained weights never go through this. Returns batches used.
    """
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    was_training = encoder.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    encoder.train()
    n = 0
    for args in batches:
        encoder(*args)
        n += 1
        if n >= max_batches:
            break
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    encoder.train(was_training)
    return n
