"""villa's GRAIN objective, as Stage 2 builds it from its config, against GRAIN's own code on identical inputs:
L_ic, L_rd, L_box, their total, and the Hungarian assignments (docs/grain.md, "Checked against GRAIN's code").

    git clone https://github.com/shaunak27/grain-clip /tmp/grain-clip        # any checkout of GRAIN's code
    python -m fidelity.grain_losses --grain_repo /tmp/grain-clip --record docs/results/grain_fidelity/reference.pt \
        --json docs/results/grain_fidelity/results.json
    python -m fidelity.grain_losses --reference docs/results/grain_fidelity/reference.pt   # no GRAIN code needed
    python -m fidelity.grain_losses --reference ... grain.box_scale=1.0                     # a changed weight: exit 1

**Recording** (``--grain_repo``) imports GRAIN's modules as they are: model/box_utils.py's HungarianMatcher,
SetCriterion and compute_box_loss as train.py builds them, and model/losses.py's CLIPLoss and
WordContrastiveLoss. Two stubs serve a CPU without a GPU: ``Tensor.cuda`` returns the tensor itself
(prepare_targets moves its dummy classes to the GPU), and a one-process gloo group serves CLIPLoss's
``torch.distributed.nn.all_gather``. Each trial draws a batch of random predictions for every decoder layer,
random target boxes (0 to ``max_boxes`` per image, GRAIN's padded layout), descriptions, region, image and caption
embeddings and a temperature. GRAIN's losses are computed as train.py sums them: ``CLIPLoss + compute_box_loss +
word_loss_weight x WordContrastiveLoss``, and saved with the inputs (``--record``, loadable with
``weights_only=True``).

**Comparing** builds villa's objective the way Stage 2 does: ``compose_config("stage2", ["experiment=docmnist_grain",
*overrides])``, then ``build_objective(cfg)``. Its ``criterion``, the function Stage 2's loss calls, runs on each
recorded input. Every term and the total must match GRAIN's to float rounding, and so must the last layer's
assignment. Any other weight (an override, or a change in villa's defaults) makes the check fail, with exit status
1 and the terms that differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from villa.core.config import compose_config
from villa.core.distributed import Dist
from villa.core.io import atomic_file, write_json_atomic
from villa.models.grain_head import normalized_targets
from villa.stage2.objectives import build_objective

TOLERANCE = 1e-4  # relative: float32 rounding of two implementations of one formula


def load_grain(repo: Path):
    """GRAIN's criterion pieces as its train.py builds them (the module docstring's stubs applied)."""
    if not (repo / "model" / "box_utils.py").is_file():
        sys.exit(f"error: {repo} is not a checkout of GRAIN's code (no model/box_utils.py); pass --grain_repo")
    sys.path.insert(0, str(repo))
    torch.Tensor.cuda = lambda self, *a, **k: self  # stub: GRAIN's prepare_targets calls .cuda()
    import torch.distributed as dist

    if not dist.is_initialized():  # stub: CLIPLoss gathers with torch.distributed.nn.all_gather
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)
    import configs.cc_config as config
    import model.box_utils as box_utils
    import model.losses as losses

    matcher = box_utils.build_matcher(None)  # cost_class 1, cost_bbox 5, cost_giou 2
    weight_dict = {"loss_bbox_all_boxes": 1.0, "loss_giou_all_boxes": 1.0}  # train.py's defaults
    criterion = box_utils.SetCriterion(
        22047, matcher=matcher, weight_dict=weight_dict, eos_coef=0.1, losses=["boxes", "cardinality"]
    )
    return box_utils, losses, criterion, config.max_boxes


def draw(g: torch.Generator, max_boxes: int, layers: int, batch: int, queries: int, dim: int) -> dict[str, Any]:
    """One trial's inputs: GRAIN's padded target layout and random predictions, embeddings and temperature."""
    n_per = torch.randint(0, max_boxes + 1, (batch,), generator=g)
    n_per[0] = max(int(n_per[0]), 1)
    obj_boxes = torch.zeros(batch, max_boxes, 4)
    for i, n in enumerate(n_per.tolist()):  # pixel xyxy on GRAIN's 224 canvas, padded with zero rows
        xy = torch.rand(n, 2, generator=g) * 150
        wh = torch.rand(n, 2, generator=g) * 60 + 8
        obj_boxes[i, :n] = torch.cat([xy, xy + wh], 1)
    t = int(n_per.sum())
    return {
        "n_per": n_per,
        "obj_boxes": obj_boxes,
        "pred_boxes": torch.rand(layers, batch, queries, 4, generator=g) * 0.6 + 0.2,  # cxcywh in [0, 1]
        "logits": torch.randn(layers, batch, queries, 3, generator=g),
        "desc": torch.randn(t, dim, generator=g),
        "obj_embeds": torch.randn(batch, queries, dim, generator=g),
        "img_embeds": torch.randn(batch, dim, generator=g),
        "text_embeds": torch.randn(batch, dim, generator=g),
        "scale": torch.tensor(float(torch.empty(()).uniform_(5.0, 50.0, generator=g))),
    }


def grain_side(grain, x: dict[str, Any], word_loss_weight: float = 1.0) -> dict[str, Any]:
    """GRAIN's losses on one trial, summed as its train.py sums them."""
    box_utils, losses, criterion, _ = grain
    layers = x["pred_boxes"].shape[0]
    model_out = {
        "pred_logits": x["logits"][-1],
        "pred_boxes": x["pred_boxes"][-1],
        "aux_outputs": [{"pred_logits": x["logits"][k], "pred_boxes": x["pred_boxes"][k]} for k in range(layers - 1)],
    }
    avail = (x["obj_boxes"].sum(-1) != 0).flatten().long()
    queries = x["pred_boxes"].shape[2]
    l_box = box_utils.compute_box_loss("all_boxes", criterion, model_out, x["obj_boxes"].clone(), None, None)
    targets = box_utils.prepare_targets(x["obj_boxes"].clone(), None, None, center_crop=False)
    _, idx = criterion(model_out, targets, "all_boxes", exclude_class=True)
    l_rd = losses.WordContrastiveLoss()(
        model_out, x["desc"], x["obj_embeds"], criterion, x["obj_boxes"].clone(), queries, avail, x["scale"]
    )["word_loss"]
    l_ic = losses.CLIPLoss()(x["img_embeds"], x["text_embeds"], x["scale"])["loss"]
    total = l_ic + l_box + word_loss_weight * l_rd  # train.py's loss_dict["loss"]
    assignment = sorted((i, int(q), int(j)) for i, (qs, js) in enumerate(idx) for q, j in zip(qs, js))
    return {
        "l_ic": float(l_ic),
        "l_rd": float(word_loss_weight * l_rd),
        "l_box": float(l_box),
        "total": float(total),
        "assignment": torch.tensor(assignment, dtype=torch.long).reshape(-1, 3),
    }


def villa_side(objective, x: dict[str, Any]) -> dict[str, Any]:
    """villa's Stage 2 GRAIN criterion on the same trial (the inputs as Stage 2 hands them over)."""
    avail = (x["obj_boxes"].sum(-1) != 0).flatten()
    target = normalized_targets(x["obj_boxes"].reshape(-1, 4)[avail], 224, 224)
    target_image = torch.repeat_interleave(torch.arange(len(x["n_per"])), x["n_per"])
    out = objective.criterion(
        x["pred_boxes"],
        x["obj_embeds"],
        x["img_embeds"],
        x["scale"],
        target,
        target_image,
        F.normalize(x["desc"], dim=-1),
        F.normalize(x["text_embeds"], dim=-1),
        Dist(),
    )
    img, qry, tgt = (v.tolist() for v in out["match"])
    starts = np.concatenate([[0], np.cumsum(x["n_per"].numpy())])
    assignment = sorted((i, q, j - int(starts[i])) for i, q, j in zip(img, qry, tgt))
    return {**{k: float(out[k]) for k in ("l_ic", "l_rd", "l_box", "total")}, "assignment": assignment}


def compare(reference: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    cfg = compose_config("stage2", ["experiment=docmnist_grain", *overrides])
    objective = build_objective(cfg)
    worst = {k: 0.0 for k in ("l_ic", "l_rd", "l_box", "total")}
    same = 0
    for x, theirs in zip(reference["inputs"], reference["grain"]):
        ours = villa_side(objective, x)
        for k in worst:
            worst[k] = max(worst[k], abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-6))
        same += ours["assignment"] == [tuple(r) for r in theirs["assignment"].tolist()]
    differ = [k for k, v in worst.items() if v > TOLERANCE]
    return {
        "overrides": overrides,
        "grain_config": {
            k: v
            for k, v in cfg.grain.items()
            if k in ("rd_weight", "l1_weight", "giou_weight", "box_scale", "aux_loss")
        },
        "max_relative_diff": worst,
        "identical_assignments": same,
        "trials": len(reference["inputs"]),
        "terms_that_differ": differ,
        "match": not differ and same == len(reference["inputs"]),
    }


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m fidelity.grain_losses",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", help="Stage 2 overrides of villa's GRAIN objective (e.g. grain.box_scale=1)")
    p.add_argument(
        "--grain_repo", default=None, help="a checkout of github.com/shaunak27/grain-clip: record its losses"
    )
    p.add_argument("--record", default=None, help="with --grain_repo: save the inputs and GRAIN's losses here")
    p.add_argument("--reference", default=None, help="compare villa against a recorded reference (no GRAIN code)")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--queries", type=int, default=5, help="GRAIN's default")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the summary here")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.grain_repo:
        grain = load_grain(Path(a.grain_repo))
        g = torch.Generator().manual_seed(a.seed)
        inputs = [draw(g, grain[3], a.layers, a.batch, a.queries, a.dim) for _ in range(a.trials)]
        commit = os.popen(f"git -C {a.grain_repo} rev-parse HEAD 2>/dev/null").read().strip() or "unknown"
        reference = {
            "grain_commit": commit,
            "seed": a.seed,
            "inputs": inputs,
            "grain": [grain_side(grain, x) for x in inputs],
        }
        if a.record:
            with atomic_file(a.record) as tmp:
                torch.save(reference, tmp)
    elif a.reference:
        reference = torch.load(a.reference, map_location="cpu", weights_only=True)
    else:
        p.error("pass --grain_repo (run GRAIN's code) or --reference (a recorded run)")
    res = {
        "command": "python -m fidelity.grain_losses " + " ".join(sys.argv[1:] if argv is None else argv),
        "grain_commit": reference["grain_commit"],
        **compare(reference, a.overrides),
        "targets_per_batch": [
            min(int(x["n_per"].sum()) for x in reference["inputs"]),
            max(int(x["n_per"].sum()) for x in reference["inputs"]),
        ],
        "value_ranges": {
            k: [min(r[k] for r in reference["grain"]), max(r[k] for r in reference["grain"])]
            for k in ("l_ic", "l_rd", "l_box", "total")
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(res, indent=2))
    if a.json:
        write_json_atomic(a.json, res)
    if not res["match"]:
        differ = ", ".join(res["terms_that_differ"]) or "the assignments"
        print(f"error: villa's GRAIN objective differs from GRAIN's code in {differ}", file=sys.stderr)
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
