"""Fine-grained image-text evaluation of any model villa loads (open_clip tags, checkpoint paths, villa checkpoints).

    python -m villa.evaluate.finegrained benchmark=winoground data_dir=/data/winoground model.name=RN50 model.pretrained=openai
    python -m villa.evaluate.finegrained benchmark=valse data_dir=/data/valse model.pretrained=checkpoints/.../best.pt
    python -m villa.evaluate.finegrained benchmark=vsr data_dir=/data/vsr split=test
    python -m villa.evaluate.finegrained benchmark=svo_probes data_dir=/data/svo_probes
    python -m villa.evaluate.finegrained benchmark=coco_order data_dir=/data/coco   # ARO's COCO-Order (needs villa[aro])
    python -m villa.evaluate.finegrained benchmark=docmnist data_dir=data/docmnist_30000_15.2 model.pretrained=<villa ckpt>

Prints a table and writes the metrics as JSON (``output``). Scores are cosines of global image and text embeddings
(villa.evaluate.finegrained.scorer); the docmnist benchmark adds the region-level readout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from villa.core.config import hydra_entry
from villa.core.errors import VillaError
from villa.core.io import write_json_atomic
from villa.core.runtime import get_runtime
from villa.core.schemas import validate_config
from villa.evaluate.finegrained import benchmarks as B
from villa.evaluate.finegrained.docmnist_binding import build_benchmark, score_benchmark
from villa.evaluate.finegrained.order import ORDER_DATASETS, load_order, score_order
from villa.evaluate.finegrained.scorer import Scorer
from villa.models.clip import create_clip

log = logging.getLogger("villa.evaluate.finegrained")


def run(cfg: DictConfig) -> dict[str, Any]:
    validate_config(cfg, "finegrained")
    data = Path(cfg.data_dir)
    if not data.is_dir():
        raise VillaError(f"data_dir {data} does not exist; pass the folder holding the {cfg.benchmark} files")
    # read and check the benchmark's files before any weights load
    loaded: Any
    if cfg.benchmark == "winoground":
        loaded = B.load_winoground(data)
    elif cfg.benchmark == "valse":
        loaded = B.load_valse(data, valid_only=cfg.valse_valid_only)
    elif cfg.benchmark == "vsr":
        loaded = B.load_vsr(data, cfg.split)
    elif cfg.benchmark == "svo_probes":
        loaded = B.load_svo_probes(data)
    elif cfg.benchmark == "sugarcrepe":
        loaded = B.load_sugarcrepe(data)
    elif cfg.benchmark == "aro":
        loaded = B.load_aro(data)
    elif cfg.benchmark in ORDER_DATASETS:
        loaded = load_order(data, cfg.benchmark, cfg.split, cfg.seed, cfg.spacy_model, cfg.max_words)
    else:
        loaded = build_benchmark(data, seed=cfg.seed)
    runtime = get_runtime(cfg.device)
    clip = create_clip(cfg.model.name, cfg.model.pretrained, device=runtime.device)
    scorer = Scorer(clip, runtime, cfg.batch_size, sentence_mean=cfg.benchmark == "docmnist")
    if cfg.benchmark == "winoground":
        res = B.score_winoground(loaded, scorer)
    elif cfg.benchmark == "valse":
        res = B.score_valse(loaded, scorer)
    elif cfg.benchmark == "vsr":
        res = B.score_vsr(loaded, scorer, cfg.split)
    elif cfg.benchmark == "svo_probes":
        res = B.score_svo_probes(loaded, scorer)
    elif cfg.benchmark == "sugarcrepe":
        res = B.score_sugarcrepe(loaded, scorer)
    elif cfg.benchmark == "aro":
        res = B.score_aro(loaded, scorer)
    elif cfg.benchmark in ORDER_DATASETS:
        res = score_order(loaded, scorer)
        res.update({"split": cfg.split, "seed": cfg.seed, "spacy_model": cfg.spacy_model, "max_words": cfg.max_words})
    else:
        res = score_benchmark(loaded, scorer)
        res.update({k: loaded[k] for k in ("data", "seed", "generator_seed", "test_pool")})
    res.update({"benchmark": cfg.benchmark, "model": clip.source, "global_embedding": scorer.mode})
    write_json_atomic(Path(cfg.output), res)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict) or k in ("global", "region")}, indent=1))
    log.info("wrote %s", cfg.output)
    return res


main = hydra_entry("finegrained", run, __doc__)


if __name__ == "__main__":
    main()
