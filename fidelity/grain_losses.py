"""GRAIN mode against GRAIN's own code, side by side on identical inputs: L_ic, L_rd, L_box and the Hungarian
assignments (docs/grain.md, "Checked against GRAIN's code").

    git clone https://github.com/shaunak27/grain-clip /tmp/grain-clip        # any checkout of GRAIN's code
    python -m fidelity.grain_losses --grain_repo /tmp/grain-clip --json docs/results/grain_fidelity/results.json

GRAIN's modules are imported from ``--grain_repo`` as they are (model/box_utils.py's HungarianMatcher, SetCriterion
and compute_box_loss as train.py builds them; model/losses.py's CLIPLoss and WordContrastiveLoss) with two stubs for
a CPU without a GPU: ``Tensor.cuda`` returns the tensor itself (prepare_targets moves its dummy classes to the GPU),
and a one-process gloo group for CLIPLoss's ``torch.distributed.nn.all_gather``. Each trial draws a batch of random
predictions for every decoder layer, random target boxes (0 to ``max_boxes`` per image, GRAIN's padded layout),
descriptions, region / image / caption embeddings and a temperature, then compares:

- L_box: GRAIN's ``compute_box_loss`` vs villa's ``grain.box_scale * (L1 + GIoU)`` of the last layer
  (``grain.aux_loss=false``, the default), and GRAIN's per-layer terms summed vs villa's ``aux_loss=true``;
- L_rd: GRAIN's ``WordContrastiveLoss`` vs villa's sum over matched queries divided by their number;
- L_ic: GRAIN's ``CLIPLoss`` vs villa's ``infonce`` on the normalised embeddings;
- the Hungarian assignment of the last layer: the same (query, target) pairs in every image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from villa.core.io import write_json_atomic
from villa.models.grain_head import normalized_targets
from villa.stage2.objectives.base import infonce
from villa.stage2.objectives.grain import grain_losses


def load_grain(repo: Path):
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


def trial(g: torch.Generator, grain, layers: int, batch: int, queries: int, dim: int) -> dict:
    box_utils, losses, criterion, max_boxes = grain
    n_per = torch.randint(0, max_boxes + 1, (batch,), generator=g)
    n_per[0] = max(int(n_per[0]), 1)
    obj_boxes = torch.zeros(batch, max_boxes, 4)
    for i, n in enumerate(n_per.tolist()):  # pixel xyxy on GRAIN's 224 canvas, padded with zero rows
        xy = torch.rand(n, 2, generator=g) * 150
        wh = torch.rand(n, 2, generator=g) * 60 + 8
        obj_boxes[i, :n] = torch.cat([xy, xy + wh], 1)
    avail = (obj_boxes.sum(-1) != 0).flatten().long()
    pred_boxes = torch.rand(layers, batch, queries, 4, generator=g) * 0.6 + 0.2  # cxcywh in [0, 1]
    logits = torch.randn(layers, batch, queries, 3, generator=g)
    model_out = {
        "pred_logits": logits[-1],
        "pred_boxes": pred_boxes[-1],
        "aux_outputs": [{"pred_logits": logits[k], "pred_boxes": pred_boxes[k]} for k in range(layers - 1)],
    }
    t = int(avail.sum())
    desc = torch.randn(t, dim, generator=g)
    obj_embeds = torch.randn(batch, queries, dim, generator=g)
    img_embeds, text_embeds = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    scale = torch.tensor(float(torch.empty(()).uniform_(5.0, 50.0, generator=g)))

    # GRAIN's code
    g_box = box_utils.compute_box_loss("all_boxes", criterion, model_out, obj_boxes.clone(), None, None)
    targets = box_utils.prepare_targets(obj_boxes.clone(), None, None, center_crop=False)
    g_dict, g_idx = criterion(model_out, targets, "all_boxes", exclude_class=True)
    g_aux = {
        k: sum(float(v) for n, v in g_dict.items() if n.startswith(f"loss_{k}_all_boxes")) for k in ("bbox", "giou")
    }
    g_rd = losses.WordContrastiveLoss()(
        model_out, desc, obj_embeds, criterion, obj_boxes.clone(), queries, avail, scale
    )["word_loss"]
    g_ic = losses.CLIPLoss()(img_embeds, text_embeds, scale)["loss"]

    # villa's
    present = obj_boxes.reshape(-1, 4)[avail.bool()]
    target = normalized_targets(present, 224, 224)
    target_image = torch.repeat_interleave(torch.arange(batch), n_per)
    args = (target, target_image, F.normalize(desc, dim=-1), 0, scale, torch.tensor(float(t)))
    last = grain_losses(pred_boxes, obj_embeds, *args)
    every = grain_losses(pred_boxes, obj_embeds, *args, aux=True)
    v_box = 1.5 * (last["l1"] + last["giou"])  # grain.box_scale x (grain.l1_weight L1 + grain.giou_weight GIoU)
    v_rd = last["rd_sum"] / last["matched"]
    v_ic = infonce(F.normalize(img_embeds, dim=-1), F.normalize(text_embeds, dim=-1), scale)
    img, qry, tgt = (x.tolist() for x in last["match"])
    starts = np.concatenate([[0], np.cumsum(n_per.numpy())])
    ours = {(i, q, j - starts[i]) for i, q, j in zip(img, qry, tgt)}
    theirs = {(i, int(q), int(j)) for i, (qs, js) in enumerate(g_idx) for q, j in zip(qs, js)}
    return {
        "targets": t,
        "L_box": abs(float(g_box) - float(v_box)),
        "L_box_aux": max(abs(g_aux["bbox"] - float(every["l1"])), abs(g_aux["giou"] - float(every["giou"]))),
        "L_rd": abs(float(g_rd) - float(v_rd)),
        "L_ic": abs(float(g_ic) - float(v_ic)),
        "same_assignment": ours == theirs,
        "values": {"L_box": float(g_box), "L_rd": float(g_rd), "L_ic": float(g_ic)},
    }


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m fidelity.grain_losses",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--grain_repo", required=True, help="a checkout of github.com/shaunak27/grain-clip")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--queries", type=int, default=5, help="GRAIN's default")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the summary here")
    a = p.parse_args()
    grain = load_grain(Path(a.grain_repo))
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.perf_counter()
    rows = [trial(g, grain, a.layers, a.batch, a.queries, a.dim) for _ in range(a.trials)]
    commit = os.popen(f"git -C {a.grain_repo} rev-parse HEAD 2>/dev/null").read().strip() or "unknown"
    out = {
        "command": "python -m fidelity.grain_losses " + " ".join(sys.argv[1:]),
        "grain_commit": commit,
        "trials": a.trials,
        "layers": a.layers,
        "images_per_batch": a.batch,
        "queries": a.queries,
        "seed": a.seed,
        "targets_per_batch": [min(r["targets"] for r in rows), max(r["targets"] for r in rows)],
        "max_abs_diff": {k: max(r[k] for r in rows) for k in ("L_box", "L_box_aux", "L_rd", "L_ic")},
        "identical_assignments": sum(r["same_assignment"] for r in rows),
        "value_ranges": {
            k: [min(r["values"][k] for r in rows), max(r["values"][k] for r in rows)] for k in ("L_box", "L_rd", "L_ic")
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=2))
    if a.json:
        write_json_atomic(a.json, out)


if __name__ == "__main__":
    main()
