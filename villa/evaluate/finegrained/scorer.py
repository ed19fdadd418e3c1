"""Image-text matching scores for the fine-grained benchmarks: cosine of global image and text embeddings.

Each distinct image (by key: its path) and each distinct text is embedded once, in batches, on CPU or GPU. The
global image embedding is the one the model was trained to give:

- villa checkpoints (Stage 2, baseline, pretraining) go through the region path with the whole-image box, with the
  region options they were trained with (input size, normalisation), as the one-to-one baseline trains;
- ``objective=grain`` checkpoints give GRAIN's own global readout: the decoder's image query, which GRAIN's L_ic trains
  against the caption (unless the checkpoint was trained with ``grain.image_embedding=attnpool``, whose image
  embedding is the region path's, as above);
- other models (open_clip tags and checkpoints) use open_clip's ``encode_image`` with its eval preprocessing.

``region_scores`` gives the region-level variant: the region path on given boxes against given texts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from villa.core.errors import VillaError
from villa.core.runtime import Runtime
from villa.evaluate.retrieval import region_options
from villa.models.clip import Clip
from villa.models.grain_head import image_tokens
from villa.models.region_encoder import RegionEncoder
from villa.models.text import encode_texts, mean_text_embeddings


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise VillaError(f"cannot read image {path} ({type(e).__name__}: {e}); replace the file") from e


class Scorer:
    """Cosine scores between images and texts for one model; embeddings cached by image key and by text."""

    def __init__(self, clip: Clip, runtime: Runtime, batch_size: int = 64, sentence_mean: bool = False):
        """``sentence_mean``: a text's embedding is the mean of its sentences' (split on "."), as Stage 2 embeds
        captions and region texts (DocMNIST); else each text is encoded whole (public benchmarks)."""
        self.clip, self.runtime, self.batch_size = clip, runtime, batch_size
        self.sentence_mean = sentence_mean
        villa_ckpt = clip.villa_checkpoint
        self.mode = "region" if villa_ckpt else "clip"
        self.opts: dict[str, Any] = region_options(clip.pretrained, None, None) if villa_ckpt else {}
        self.grain_head = grain_image_head(clip, runtime) if villa_ckpt else None
        if self.grain_head is not None:
            self.mode = "grain_query"
        self._images: dict[str, torch.Tensor] = {}
        self._texts: dict[str, torch.Tensor] = {}
        self.region_encoder: Optional[RegionEncoder] = None
        if self.mode == "region" or _is_resnet(clip):
            self.region_encoder = (
                RegionEncoder(
                    clip.model.visual,
                    normalize=bool(self.opts.get("normalize", False)),
                    input_size=self.opts.get("input_size"),
                )
                .to(runtime.device)
                .eval()
            )
        if self.mode == "clip":
            size = clip.model_cfg.get("vision_cfg", {}).get("image_size", 224)
            self.transform = open_clip.image_transform(size, is_train=False)

    # -- embeddings ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def embed_images(self, keys: Sequence[str], images: Sequence[Any]) -> None:
        """Embed the images whose key is not cached yet (``images[i]``: a path or a PIL image)."""
        todo = [(k, im) for k, im in dict(zip(keys, images)).items() if k not in self._images]
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s : s + self.batch_size]
            pil = [im if isinstance(im, Image.Image) else load_rgb(Path(im)) for _, im in chunk]
            z = self._global(pil)
            for (k, _), v in zip(chunk, z):
                self._images[k] = v

    def _global(self, pil: list[Image.Image]) -> torch.Tensor:
        rt = self.runtime
        if self.mode == "clip":
            x = torch.stack([self.transform(im) for im in pil]).to(rt.device)
            with rt.autocast():
                z = self.clip.model.encode_image(x)
            return F.normalize(z.float(), dim=-1).cpu()
        images, boxes = _pad([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in pil])
        assert self.region_encoder is not None
        if self.mode == "grain_query":  # GRAIN's image query on the tower's tokens
            x = self.region_encoder.prepare(images.to(rt.device).float().div_(255))
            with rt.autocast():
                feat, positions = image_tokens(self.clip.model.visual, x)
                z = self.grain_head(feat, positions)[2]
            return F.normalize(z.float(), dim=-1).cpu()
        with rt.autocast():
            z = self.region_encoder(
                images.to(rt.device).float().div_(255), boxes.to(rt.device), torch.arange(len(pil), device=rt.device)
            )
        return F.normalize(z.float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if todo:
            if self.sentence_mean:
                z = mean_text_embeddings(self.clip, todo, self.runtime)
            else:
                z = encode_texts(self.clip, todo, self.runtime)
            self._texts.update(zip(todo, z))

    def images(self, keys: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._images[k] for k in keys])

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._texts[t] for t in texts])

    @property
    def n_embedded(self) -> dict[str, int]:
        return {"images": len(self._images), "texts": len(self._texts)}

    # -- scores --------------------------------------------------------------------------------------------------

    def pair_scores(self, image_keys: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """Cosine of ``image_keys[i]`` with ``texts[i]`` (both already embedded), (N,)."""
        return (self.images(image_keys) * self.texts(texts)).sum(-1).numpy()

    @torch.no_grad()
    def region_embeddings(
        self, images: Sequence[Any], boxes: Sequence[np.ndarray], keys: Optional[Sequence[str]] = None
    ) -> torch.Tensor:
        """Region-path embeddings (normalised) of ``boxes[i]`` (K_i, 4) in ``images[i]``, concatenated (sum K_i, D).

        With ``keys`` and the region-path global readout, each image's whole-image box rides along in the same
        forward pass and its global embedding is cached under ``keys[i]``: one pass of the network per image."""
        if self.region_encoder is None:
            raise VillaError(f"{self.clip.model_name} has no region path (a ModifiedResNet image tower is needed)")
        with_global = keys is not None and self.mode == "region"
        out = []
        for s in range(0, len(images), self.batch_size):
            pil = [im if isinstance(im, Image.Image) else load_rgb(Path(im)) for im in images[s : s + self.batch_size]]
            bx = [
                torch.as_tensor(np.asarray(b), dtype=torch.float32).reshape(-1, 4)
                for b in boxes[s : s + self.batch_size]
            ]
            imgs, whole = _pad([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in pil])
            if with_global:
                bx = [torch.cat([whole[i : i + 1], b]) for i, b in enumerate(bx)]
            owner = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(bx)])
            with self.runtime.autocast():
                z = self.region_encoder(
                    imgs.to(self.runtime.device).float().div_(255),
                    torch.cat(bx).to(self.runtime.device),
                    owner.to(self.runtime.device),
                )
            z = F.normalize(z.float(), dim=-1).cpu()
            if with_global:
                first = torch.cumsum(torch.tensor([0] + [len(b) for b in bx[:-1]]), 0)
                for i, k in enumerate(keys[s : s + self.batch_size]):  # type: ignore[index]
                    self._images[k] = z[first[i]]
                keep = torch.ones(len(z), dtype=torch.bool)
                keep[first] = False
                z = z[keep]
            out.append(z)
        return torch.cat(out) if out else torch.zeros(0, self.clip.embed_dim)


def grain_image_head(clip: Clip, runtime: Runtime):
    """A ``objective=grain`` checkpoint's head when its image query is the image embedding it trained, else None."""
    from villa.core.checkpoint import load_checkpoint
    from villa.evaluate.retrieval import load_grain_head

    path = Path(str(clip.pretrained or ""))
    if not path.is_file():
        return None
    state = load_checkpoint(path, "checkpoint")
    grain_cfg = (state.get("config") or {}).get("grain") or {}
    if "grain_state" not in state or grain_cfg.get("image_embedding", "query") != "query":
        return None
    return load_grain_head(clip, runtime.device, state)


def _is_resnet(clip: Clip) -> bool:
    from open_clip.modified_resnet import ModifiedResNet

    return isinstance(clip.model.visual, ModifiedResNet)


def _pad(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (3, H, W) images zero-padded right/bottom to one batch, and each image's whole-image box."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    out = torch.zeros(len(images), 3, h, w, dtype=torch.uint8)
    boxes = torch.zeros(len(images), 4)
    for k, im in enumerate(images):
        out[k, :, : im.shape[1], : im.shape[2]] = im
        boxes[k] = torch.tensor([0.0, 0.0, im.shape[2], im.shape[1]])
    return out, boxes
