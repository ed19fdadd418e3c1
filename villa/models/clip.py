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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from villa.core.checkpoint import CheckpointError, load_checkpoint
from villa.core.env import hf_offline, resolve_weights
from villa.core.errors import VillaError
from villa.models.region_encoder import class_token_pool

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # villa-tiny-rn, villa-small-rn
open_clip.add_model_config(MODEL_CONFIG_DIR)

NO_WEIGHTS = (None, "", "none", "None", "random")
CHECKPOINT_FIX = "pass a villa checkpoint (<checkpoint_dir>/best.pt), an open_clip checkpoint or folder, a tag or none"
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
    if hf_offline():
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
                model_name,
                pretrained=local or tag,
                precision=precision,
                device=device,
                force_quick_gelu=quick,
                cache_dir=cache_dir,
            )
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


def _read_weights_file(path: Path, model_name: str) -> tuple[Optional[dict[str, Any]], str]:
    """``pretrained=<path>``: the villa checkpoint it holds (and the model name it records), or ``(None, name)``
    where open_clip reads the file itself (its own checkpoint, safetensors or OpenAI's TorchScript)."""
    ckpt = None
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        obj = read_open_clip_folder(path)  # villa.export --format open_clip
    elif path.is_dir():
        raise VillaError(f"pretrained={path} is a folder without open_clip_config.json, not a model; {CHECKPOINT_FIX}")
    elif path.suffix == ".safetensors":
        obj = {}  # open_clip's own weights format: open_clip reads it below
    else:
        try:
            obj = load_checkpoint(
                path,
                "pretrained checkpoint",
                "pass a villa checkpoint (<checkpoint_dir>/best.pt), an open_clip checkpoint or folder, a tag or none",
            )
        except CheckpointError as e:
            if e.kind != "corrupt" or not zipfile.is_zipfile(path):
                raise
            obj = {}  # a zip archive torch.load refuses may be OpenAI's TorchScript: open_clip decides below
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
    return ckpt, model_name


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
    pretrained = resolve_weights(pretrained)
    if pretrained not in NO_WEIGHTS and (os.sep in str(pretrained) or os.path.exists(str(pretrained))):
        path = Path(str(pretrained))
        ckpt, model_name = _read_weights_file(path, model_name)
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
        raise VillaError(
            f"{folder} is not an open_clip folder villa can read ({type(e).__name__}: {e}); export it "
            "again with python -m villa.export --format open_clip"
        ) from None
    v = meta.get("villa") or {}
    return {
        "format": "villa-clip",
        "model_name": v.get("model_name") or folder.name,
        "model_cfg": meta["model_cfg"],
        "state_dict": weights,
        "kind": v.get("kind"),
        "config": {"model": v.get("region_options") or {}},
    }


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
