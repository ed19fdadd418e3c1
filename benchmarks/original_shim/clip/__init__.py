"""A stand-in for OpenAI's ``clip`` package, for benchmarks/bench_original.py: the original ViLLA code calls
``clip.load("RN50", "cuda")``, which downloads OpenAI's weights. Here ``load`` builds open_clip's CLIP from the
file in ``$VILLA_BENCH_CLIP`` (``{"model_cfg", "state_dict"}``, written by the harness: the same weights villa's
side loads), and ``tokenize`` is open_clip's tokenizer (OpenAI's BPE, 77 tokens by default, as clip's).
"""

import os

import open_clip
import torch


def load(name="RN50", device="cpu", jit=False, download_root=None):
    path = os.environ["VILLA_BENCH_CLIP"]
    obj = torch.load(path, map_location="cpu", weights_only=False)
    model = open_clip.model.CLIP(**obj["model_cfg"])
    model.load_state_dict(obj["state_dict"], strict=True)
    return model.eval(), None


def tokenize(texts, context_length=77, truncate=False):
    return open_clip.tokenize([texts] if isinstance(texts, str) else list(texts), context_length=context_length)
