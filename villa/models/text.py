"""The text tower's side: prompt-averaged attribute embeddings and the mean sentence embedding of each text, cached
on disk per text tower."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import open_clip
import torch
import torch.nn.functional as F

from villa.core.errors import VillaError
from villa.core.io import atomic_file
from villa.core.runtime import Runtime
from villa.models.clip import Clip


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


log = logging.getLogger(__name__)


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
    from villa.data.vocab import split_sentences

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
