"""villa's Python API: load a model and embed regions, images and texts; run a Stage 1 checkpoint on new data; call
the pipeline's stages with a composed config (docs/api.md).

    import villa
    model = villa.load("checkpoints/stage2/mine/best.pt")            # or an open_clip tag / "none"
    z = model.encode_regions([image], [[[0, 0, 28, 28], [28, 0, 56, 28]]])   # (2, D), L2-normalised
    t = model.encode_text(["a red digit", "a circle"])                      # (2, D)
    (z @ t.T)                                                               # cosines
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from villa.core.errors import VillaError

ImageLike = Union["PIL.Image.Image", torch.Tensor, np.ndarray]  # noqa: F821 - PIL is imported lazily


def _as_uint8_chw(image: ImageLike) -> torch.Tensor:
    """PIL image, (H, W, 3) uint8 array, or (3, H, W) uint8 / float [0, 1] tensor -> (3, H, W) uint8 tensor."""
    if isinstance(image, torch.Tensor):
        t = image
        if t.dim() != 3 or t.shape[0] != 3:
            raise VillaError(f"an image tensor must be (3, H, W), got {tuple(t.shape)}")
        return t if t.dtype == torch.uint8 else (t.clamp(0, 1) * 255).round().to(torch.uint8)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise VillaError(f"an image array must be (H, W, 3), got {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image.astype(np.uint8))).permute(2, 0, 1)
    arr = np.asarray(image.convert("RGB"))  # PIL
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


@dataclass
class VillaModel:
    """A loaded model: its region path (the one villa trains and evaluates), text tower, transform and tokenizer."""

    clip: Any  # villa.encoders.Clip
    region_options: dict[str, Any]
    device: torch.device

    @property
    def embed_dim(self) -> int:
        return self.clip.embed_dim

    @property
    def tokenizer(self):
        import open_clip

        return open_clip.get_tokenizer(self.clip.model_name)

    @property
    def transform(self):
        """What the region path does to a batch of [0, 1] images before the trunk (CLIP's mean/std when the model
        was trained with it; the input size it was trained at)."""
        return self._encoder().prepare

    def _encoder(self):
        from villa.models.region_encoder import RegionEncoder

        enc = RegionEncoder(self.clip.model.visual, self.region_options["normalize"], self.region_options["input_size"])
        return enc.to(self.device).eval()

    @torch.no_grad()
    def encode_regions(
        self, images: Sequence[ImageLike], boxes: Sequence[Any], batch_size: int = 64, normalize: bool = True
    ) -> torch.Tensor:
        """Embeddings (K, D) of every box of every image, in order: ``boxes[i]`` holds image i's boxes as
        ``[[x0, y0, x1, y1], ...]`` in pixels. Images of one size are batched together (no padding)."""
        from villa.data.batches import gather_index
        from villa.data.images import size_buckets

        if len(images) != len(boxes):
            raise VillaError(f"{len(images)} images but {len(boxes)} box lists; give one list of boxes per image")
        ims = [_as_uint8_chw(im) for im in images]
        sizes = np.array([[im.shape[2], im.shape[1]] for im in ims], np.int64).reshape(-1, 2)
        bx = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in bx])]).astype(np.int64)
        flat = np.concatenate(bx) if bx else np.zeros((0, 4), np.float32)
        for i, b in enumerate(bx):
            w, h = sizes[i]
            if (
                len(b)
                and (
                    (b[:, 0] < 0)
                    | (b[:, 1] < 0)
                    | (b[:, 2] > w)
                    | (b[:, 3] > h)
                    | (b[:, 2] <= b[:, 0])
                    | (b[:, 3] <= b[:, 1])
                ).any()
            ):
                raise VillaError(f"image {i}: a box is outside its {w}x{h} image or empty; boxes are [x0, y0, x1, y1]")
        enc = self._encoder()
        out = torch.zeros(len(flat), self.embed_dim)
        rows = np.arange(len(ims))
        for batch in size_buckets(sizes, rows, batch_size):
            batch = batch[np.diff(offsets)[batch] > 0]
            if not len(batch):
                continue
            x = torch.stack([ims[i] for i in batch]).to(self.device).float().div_(255)
            idx, owner = gather_index(offsets, batch)
            z = enc(x, torch.from_numpy(flat[idx]).to(self.device), torch.from_numpy(owner).to(self.device))
            out[torch.from_numpy(idx)] = z.float().cpu()
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image(self, images: Sequence[ImageLike], batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
        """(N, D): each whole image as one box through the region path (as the one-to-one pairs train it)."""
        ims = [_as_uint8_chw(im) for im in images]
        boxes = [[[0, 0, im.shape[2] - 1, im.shape[1] - 1]] for im in ims]
        return self.encode_regions(ims, boxes, batch_size, normalize)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], templates: Optional[Sequence[str]] = None) -> torch.Tensor:
        """(N, D) L2-normalised. With ``templates`` (each with one ``{}``), a text's embedding is the normalised mean
        over its prompts, as villa embeds attributes."""
        from villa.core.runtime import get_runtime
        from villa.models.text import encode_texts

        rt = get_runtime(str(self.device))
        if not templates:
            return F.normalize(encode_texts(self.clip, list(texts), rt).float().cpu(), dim=-1)
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise VillaError(f"template {bad[0]!r} must contain '{{}}' exactly once")
        flat = [t.format(x) for x in texts for t in templates]
        e = F.normalize(encode_texts(self.clip, flat, rt).float().cpu(), dim=-1).view(len(texts), len(templates), -1)
        return F.normalize(e.mean(1), dim=-1)


def load(
    path_or_tag: str = "openai",
    model: str = "auto",
    device: str = "cpu",
    normalize: Optional[bool] = None,
    input_size: Optional[int] = None,
) -> VillaModel:
    """A model to embed with: a villa checkpoint (Stage 2, baseline, pretraining; its region-path options come
    with it), a folder written by ``python -m villa.export --format open_clip`` (the same), an open_clip checkpoint
    or tag (with ``model=`` its architecture, e.g. ``RN50``), or ``none``."""
    from villa.core.runtime import get_runtime
    from villa.evaluate.retrieval import region_options
    from villa.models.clip import create_clip

    rt = get_runtime(device)
    clip = create_clip(model, path_or_tag, device=rt.device)
    return VillaModel(clip, region_options(clip.pretrained, normalize, input_size), rt.device)


def map_regions(
    stage1_checkpoint: str,
    data_dir: str,
    embeddings_dir: Optional[str] = None,
    out: Optional[str] = None,
    epsilon: float = 0.2,
    dataset: str = "docmnist",
    device: str = "cpu",
) -> dict:
    """Run a trained Stage 1 checkpoint on a (new) dataset's embeddings and write its mapping.feather: the
    checkpoint is copied into a fresh run folder and re-mapped without training (Stage 1's re-map path)."""
    import tempfile

    from villa.core.checkpoint import load_checkpoint
    from villa.core.config import compose_config
    from villa.core.provenance import run_fingerprint
    from villa.stage1.train import stage1_inputs, train_stage1

    state = load_checkpoint(stage1_checkpoint, "Stage 1 checkpoint")
    if state.get("kind") != "villa-stage1":
        raise VillaError(f"{stage1_checkpoint} is not a Stage 1 checkpoint (kind {state.get('kind')!r})")
    emb = embeddings_dir or str(Path(data_dir) / "embeddings")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(state["config"])
        over = [
            f"dataset={dataset}",
            f"data_dir={data_dir}",
            f"embeddings_dir={emb}",
            f"checkpoint_dir={tmp}",
            f"mapping_path={out or Path(data_dir) / 'mapping.feather'}",
            f"epsilon={epsilon}",
            f"device={device}",
            "progress=false",
            f"epochs={state['epoch']}",
        ]
        for k in (
            "seed",
            "batch_size",
            "lr",
            "weight_decay",
            "temperature",
            "original_loss",
            "drop_last",
            "precision",
            "sentence_choice",
            "region_text",
        ):
            if k in cfg:
                over.append(f"{k}={str(cfg[k]).lower() if isinstance(cfg[k], bool) else cfg[k]}")
        if "amp" in cfg and "precision" not in cfg:  # a checkpoint from before `amp` became `precision`
            over.append(f"precision={'auto' if cfg['amp'] else 'fp32'}")
        for k in ("one_proj", "adapter"):
            over.append(f"model.{k}={str(cfg['model'][k]).lower()}")
        c = compose_config("stage1", over)
        # the copied checkpoint answers for this dataset now: its fingerprint is the new run's, so Stage 1 loads it
        # and, its epochs being done, only maps (the weights are the trained ones)
        state["fingerprint"] = run_fingerprint(c, stage1_inputs(c))
        for name in ("last.pt", "best.pt"):
            torch.save(state, Path(tmp) / name)
        return train_stage1(c)
