"""Generate DocMNIST, faithfully to the original generator and fast.

    python docmnist/generate_docmnist.py --attribute_budget=30000 --target_sample_complexity=16

Each image is an 84x84 black canvas with a 3x3 grid of 28x28 cells. Digits are taken one at a time (at most 9);
each is a random MNIST digit of the split's pool, its pixels >= 120 painted one of five colours, and with a
circle, a rectangle or no shape (uniformly), of size small/medium/large. A region carries 2 attributes (digit,
colour) or 4 (+ shape, size); regions are kept while the image's running count of region-attribute pairs stays
<= the target sample complexity. A split stops at the first image that would push its pairs over its budget.

Unlike the original (per-digit Python with torch tensors), the layout of a whole split is drawn as arrays and
the images are rendered a chunk at a time with array indexing; only PNG encoding is per image (threaded).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from PIL import Image
from tqdm import tqdm

from docmnist.mnist import DigitPools, load_digit_pools
from villa.core.env import data_root
from villa.core.errors import VillaError, exit_on_error
from villa.core.io import atomic_dir, check_writable
from villa.core.log import setup_logging
from villa.data.vocab import SENTENCE_SEP, Vocabulary, load_vocab

log = logging.getLogger(__name__)

CELL = 28
GRID = 3
CANVAS = CELL * GRID
MAX_REGIONS = GRID * GRID
MAX_COMPLEXITY = 4 * MAX_REGIONS  # every region with digit, colour, shape and size
PNG_BYTES = 1500  # a lower bound on one 84x84 DocMNIST PNG
COLOR_THRESHOLD = 120
SHAPES = ("circle", "rectangle")  # drawn uniformly among (circle, rectangle, none)
SIZES = ("small", "medium", "large")
POS_LO, POS_HI = 5, 19  # shape centre / start row and column, inclusive
SPLITS = ("train", "val", "test")


def shape_mask_bank(vocab: Vocabulary) -> np.ndarray:
    """Every shape the generator can draw, as (2 * 3 * 15 * 15, 28, 28) bool masks.

    Index = ((shape * 3 + size) * 15 + (row - 5)) * 15 + (col - 5), shape 0 = circle, 1 = rectangle. Drawn with
    scikit-image's ``circle_perimeter`` (centre, radius 1/3/5) and ``rectangle_perimeter`` (start, end = start +
    1/4/7, clipped to 28x28), as the original. Both are translation-invariant on integer positions, so each of the
    six (shape, size) outlines is drawn once at the origin and shifted to every position (pixels outside the cell
    dropped, as ``shape=`` / ``clip=`` do); ``tests/test_docmnist.py`` checks the bank against skimage call by call.
    """
    from skimage.draw import circle_perimeter, rectangle_perimeter

    radius = vocab.extra["docmnist"]["circle_radius"]
    offset = vocab.extra["docmnist"]["rectangle_offset"]
    n = POS_HI - POS_LO + 1
    bank = np.zeros((2, 3, n, n, CELL, CELL), dtype=bool)
    start = np.arange(POS_LO, POS_HI + 1)
    for zi, z in enumerate(SIZES):
        outlines = (circle_perimeter(0, 0, radius[z]), rectangle_perimeter((0, 0), end=(offset[z], offset[z])))
        for si, (dr, dc) in enumerate(outlines):
            rr = start[:, None, None] + np.asarray(dr)[None, None, :]  # (row, 1, point)
            cc = start[None, :, None] + np.asarray(dc)[None, None, :]  # (1, col, point)
            rr, cc = np.broadcast_arrays(rr, cc)
            inside = (rr >= 0) & (rr < CELL) & (cc >= 0) & (cc < CELL)
            r_i, c_i, _ = np.nonzero(inside)
            bank[si, zi, r_i, c_i, rr[inside], cc[inside]] = True
    return bank.reshape(-1, CELL, CELL)


@dataclass
class SplitLayout:
    """Everything drawn for one split, as flat arrays: images (I,) and regions (R,) in image order."""

    split: str
    n_regions: np.ndarray  # (I,) regions per image
    pairs: np.ndarray  # (I,) region-attribute pairs per image
    pool_index: np.ndarray  # (R,) digit index into the split's pool
    digit: np.ndarray  # (R,) digit label 0..9
    color: np.ndarray  # (R,) 0..4
    shape: np.ndarray  # (R,) 0 circle, 1 rectangle, 2 none
    size: np.ndarray  # (R,) 0..2 (meaningless where shape == 2)
    pos: np.ndarray  # (R, 2) shape centre/start (row, col) in 5..19
    cell: np.ndarray  # (R,) 0..8, row-major
    template: np.ndarray  # (R, 4) template index per attribute slot (digit, colour, shape, size)
    caption_key: np.ndarray  # (R, 4) random keys that shuffle the caption's sentences

    @property
    def n_images(self) -> int:
        return len(self.n_regions)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_regions)])


def draw_layout(
    rng: np.random.Generator,
    split: str,
    pool_size: int,
    target: int,
    budget: int,
    n_templates: Sequence[int],
    images: Optional[int] = None,
) -> SplitLayout:
    """Draw a split's images until the next one would push its region-attribute pairs over ``budget``; with
    ``images``, exactly that many images instead (whatever their pairs: the fixed-images control)."""
    if images is not None:
        budget = 1 << 62
        chunk = int(min(max(256, images + 64), 1 << 16))
    else:
        chunk = int(min(max(256, budget // max(target - 1, 1) + 64), 1 << 16))
    count = 0
    parts: list[dict[str, np.ndarray]] = []
    total = 0
    done = False
    while not done:
        m = chunk
        d = {
            "pool_index": rng.integers(pool_size, size=(m, MAX_REGIONS)),
            "color": rng.integers(5, size=(m, MAX_REGIONS)),
            "shape": rng.integers(3, size=(m, MAX_REGIONS)),
            "size": rng.integers(3, size=(m, MAX_REGIONS)),
            "pos": rng.integers(POS_LO, POS_HI + 1, size=(m, MAX_REGIONS, 2)),
            "cellperm": np.argsort(rng.random((m, MAX_REGIONS)), axis=1, kind="stable"),
            "template": rng.integers(0, np.asarray(n_templates), size=(m, MAX_REGIONS, 4)),
            "caption_key": rng.random((m, MAX_REGIONS, 4)),
        }
        # Digits one at a time: the image closes at the first digit whose attributes would exceed the target.
        n_attr = 2 + 2 * (d["shape"] < 2)
        cum = np.cumsum(n_attr, axis=1)
        n_reg = (cum <= target).sum(axis=1)
        pairs = np.where(n_reg > 0, cum[np.arange(m), np.maximum(n_reg - 1, 0)], 0)
        # With a target below 4 an image can close before its first region; such empty images are skipped.
        nonempty = n_reg > 0
        d = {k: v[nonempty] for k, v in d.items()}
        n_reg, pairs = n_reg[nonempty], pairs[nonempty]
        cum_pairs = total + np.cumsum(pairs)
        take = int(np.searchsorted(cum_pairs, budget, side="right"))  # images while the total stays <= budget
        if images is not None:
            take = min(take, images - count)
            done = count + take >= images
        elif take < len(pairs):
            done = True
        count += take
        d = {k: v[:take] for k, v in d.items()}
        d["n_regions"], d["pairs"] = n_reg[:take], pairs[:take]
        total = int(cum_pairs[take - 1]) if take else total
        parts.append(d)
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n_reg = cat["n_regions"]
    keep = np.arange(MAX_REGIONS)[None, :] < n_reg[:, None]  # (I, 9) slots that became regions
    # Regions go to distinct random cells, listed in cell order.
    cells = np.where(keep, cat["cellperm"], MAX_REGIONS)
    cells = np.sort(cells, axis=1)
    return SplitLayout(
        split=split,
        n_regions=n_reg.astype(np.int64),
        pairs=cat["pairs"].astype(np.int64),
        pool_index=cat["pool_index"][keep],
        digit=np.zeros(0),  # filled by the caller from the pool labels
        color=cat["color"][keep],
        shape=cat["shape"][keep],
        size=cat["size"][keep],
        pos=cat["pos"][keep],
        cell=cells[keep],
        template=cat["template"][keep],
        caption_key=cat["caption_key"][keep],
    )


def region_attributes(layout: SplitLayout, vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Vocabulary indices of each region's attribute slots (R, 4) and which slots exist (R, 4)."""
    digit_words = vocab.group_attributes("digit")
    colors = vocab.group_attributes("color")
    idx = vocab.index
    digit_ids = np.array([idx[w] for w in digit_words])[layout.digit]
    color_ids = np.array([idx[c] for c in colors])[layout.color]
    shape_ids = np.array([idx[s] for s in SHAPES] + [-1])[layout.shape]
    size_ids = np.array([idx[z] for z in SIZES])[layout.size]
    has_shape = layout.shape < 2
    attr = np.stack([digit_ids, color_ids, np.where(has_shape, shape_ids, -1), np.where(has_shape, size_ids, -1)], 1)
    return attr, attr >= 0


def captions(layout: SplitLayout, vocab: Vocabulary, attr: np.ndarray, valid: np.ndarray) -> list[str]:
    """One sentence per region-attribute pair from its group's templates; duplicates removed, order shuffled,
    joined with " . "."""
    n_t = max(len(t) for t in vocab.templates)
    sentences = np.array(
        [
            vocab.templates[vocab.attribute_group[a]][t].format(vocab.attributes[a])
            if t < len(vocab.templates[vocab.attribute_group[a]])
            else ""
            for a in range(len(vocab))
            for t in range(n_t)
        ],
        dtype=object,
    )
    region_image = np.repeat(np.arange(layout.n_images), layout.n_regions)
    img = np.broadcast_to(region_image[:, None], attr.shape)[valid]
    sid = (attr * n_t + layout.template)[valid]
    key = layout.caption_key[valid]
    # Unique (image, sentence); the first occurrence's key decides the sentence's place.
    order = np.lexsort((key, sid, img))
    img, sid, key = img[order], sid[order], key[order]
    first = np.ones(len(img), dtype=bool)
    first[1:] = (img[1:] != img[:-1]) | (sid[1:] != sid[:-1])
    img, sid, key = img[first], sid[first], key[first]
    order = np.lexsort((key, img))
    img, sid = img[order], sid[order]
    bounds = np.searchsorted(img, np.arange(layout.n_images + 1))
    sent = sentences[sid]
    return [SENTENCE_SEP.join(sent[bounds[i] : bounds[i + 1]]) for i in range(layout.n_images)]


def render(
    layout: SplitLayout, pool: np.ndarray, rgb: np.ndarray, bank: np.ndarray, start: int, stop: int
) -> np.ndarray:
    """Images ``start:stop`` of a split as (n, 84, 84, 3) uint8."""
    off = layout.offsets
    r0, r1 = off[start], off[stop]
    n = stop - start
    gray = pool[layout.pool_index[r0:r1]]  # (r, 28, 28)
    color = rgb[layout.color[r0:r1]]  # (r, 3)
    tile = np.where((gray >= COLOR_THRESHOLD)[..., None], color[:, None, None, :], gray[..., None])  # uint8
    shape = layout.shape[r0:r1]
    has = shape < 2
    if has.any():
        npos = POS_HI - POS_LO + 1
        pos = layout.pos[r0:r1][has] - POS_LO
        mask_id = ((shape[has] * 3 + layout.size[r0:r1][has]) * npos + pos[:, 0]) * npos + pos[:, 1]
        shaped = tile[has]
        shaped[bank[mask_id]] = 255  # white 1-pixel perimeter over the digit
        tile[has] = shaped
    cells = np.zeros((n, GRID * GRID, CELL, CELL, 3), dtype=np.uint8)
    cells[np.repeat(np.arange(n), layout.n_regions[start:stop]), layout.cell[r0:r1]] = tile  # whole-tile copies
    canvas = cells.reshape(n, GRID, GRID, CELL, CELL, 3).transpose(0, 1, 3, 2, 4, 5)  # (n, row, y, col, x, rgb)
    return np.ascontiguousarray(canvas).reshape(n, CANVAS, CANVAS, 3)


def _write_chunk(
    lay: SplitLayout, pool: np.ndarray, rgb: np.ndarray, bank: np.ndarray, paths: list[str], root: Path, s: int, e: int
) -> int:
    """Render images ``s:e`` of a split and write their PNGs (one worker task; numpy and PNG encoding release
    the GIL, so chunks run in parallel threads)."""
    imgs = render(lay, pool, rgb, bank, s, e)
    for k in range(e - s):
        Image.fromarray(imgs[k]).save(str(root / paths[s + k]), format="PNG")
    return e - s


def _arrow(values: np.ndarray) -> pa.Array:
    """A numeric Arrow array over a numpy buffer. Arrow arrays are built from buffers here because ``pa.array``
    imports pandas, a third of a second of a 30000-pair run; the bytes written are the same."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _strings(values: Sequence[Optional[str]]) -> pa.Array:
    """An Arrow string array (``None`` is null), built from buffers as :func:`_arrow`."""
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    enc = [v.encode() if v is not None else b"" for v in values]
    offsets = np.zeros(len(enc) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)), out=offsets[1:])
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    buffers = [bitmap, pa.py_buffer(offsets), pa.py_buffer(b"".join(enc))]
    return pa.Array.from_buffers(pa.string(), len(enc), buffers, null_count=int(len(enc) - valid.sum()))


def _lists(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(_arrow(offsets.astype(np.int32)), values)


def write_feather(table: pa.Table, path: Path) -> None:
    """Feather V2 with zstd, as ``pyarrow.feather.write_feather`` writes it (an Arrow IPC file in chunks of 64K
    rows; the same bytes), without its pandas check."""
    with ipc.new_file(str(path), table.schema, options=ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table, max_chunksize=64 * 1024)


def build_table(
    layouts: list[SplitLayout], vocab: Vocabulary, first_ids: list[int]
) -> tuple[pa.Table, list[list[str]]]:
    """The annotations (the original's columns) as an Arrow table built from flat arrays and offsets."""
    cols: dict[str, list] = {k: [] for k in ("id", "split", "path", "text")}
    reg_chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("box", "digit", "color", "shape", "size", "attr", "v")}
    img_attr_chunks: list[np.ndarray] = []
    n_regions = []
    filepaths = []
    for layout, first in zip(layouts, first_ids):
        ids = np.arange(first, first + layout.n_images)
        cols["id"].append(ids)
        cols["split"] += [layout.split] * layout.n_images
        filepaths.append([f"images/{layout.split}/{i}.png" for i in ids])
        attr, valid = region_attributes(layout, vocab)
        cols["text"] += captions(layout, vocab, attr, valid)
        x0, y0 = (layout.cell % GRID) * CELL, (layout.cell // GRID) * CELL
        reg_chunks["box"].append(np.stack([x0, y0, x0 + CELL, y0 + CELL], 1))
        reg_chunks["digit"].append(layout.digit)
        reg_chunks["color"].append(layout.color)
        reg_chunks["shape"].append(layout.shape)
        reg_chunks["size"].append(layout.size)
        reg_chunks["attr"].append(attr)
        reg_chunks["v"].append(valid)
        n_regions.append(layout.n_regions)
        # the image's attribute set, in vocabulary order
        region_image = np.repeat(np.arange(layout.n_images), layout.n_regions)
        onehot = np.zeros((layout.n_images, len(vocab)), dtype=bool)
        onehot[np.broadcast_to(region_image[:, None], attr.shape)[valid], attr[valid]] = True
        img_attr_chunks.append(onehot)
    n_reg = np.concatenate(n_regions)
    reg_off = _arrow(np.concatenate([[0], np.cumsum(n_reg)]).astype(np.int32))
    box = np.concatenate(reg_chunks["box"]).astype(np.int32)
    attr = np.concatenate(reg_chunks["attr"])
    valid = np.concatenate(reg_chunks["v"])
    shape = np.concatenate(reg_chunks["shape"])
    names = np.array(vocab.attributes, dtype=object)
    color_names = np.array(vocab.group_attributes("color"), dtype=object)
    shape_names = np.array(list(SHAPES) + [None], dtype=object)
    size_names = np.array(list(SIZES), dtype=object)
    sizes = np.concatenate(reg_chunks["size"])

    def per_region(values: pa.Array) -> pa.Array:
        return pa.ListArray.from_arrays(reg_off, values)

    n_box = len(box)
    region_coord = per_region(_lists(np.arange(0, 4 * n_box + 1, 4), _arrow(box.ravel())))
    attr_off = np.concatenate([[0], np.cumsum(valid.sum(1))])
    reg_to_attr = per_region(_lists(attr_off, _strings(names[attr[valid]].tolist())))
    onehot = np.concatenate(img_attr_chunks)
    img_attr_off = np.concatenate([[0], np.cumsum(onehot.sum(1))])
    img_attr_vals = np.broadcast_to(np.arange(len(vocab)), onehot.shape)[onehot]
    n_img = len(n_reg)
    table = pa.Table.from_arrays(
        [
            _arrow(np.concatenate(cols["id"]).astype(np.int64)),
            _lists(np.arange(0, 2 * n_img + 1, 2), _arrow(np.full(2 * n_img, CANVAS, np.int32))),
            _strings([p for chunk in filepaths for p in chunk]),
            region_coord,
            _arrow(n_reg.astype(np.int32)),
            _strings(cols["split"]),
            _strings(cols["text"]),
            per_region(_arrow(np.concatenate(reg_chunks["digit"]).astype(np.int64))),
            per_region(_strings(color_names[np.concatenate(reg_chunks["color"])].tolist())),
            per_region(_strings(shape_names[shape].tolist())),
            per_region(_strings(np.where(shape < 2, size_names[sizes], None).tolist())),
            reg_to_attr,
            _lists(img_attr_off, _strings(names[img_attr_vals].tolist())),
        ],
        names=[
            "image_id",
            "image_size",
            "image_filepath",
            "region_coord",
            "num_regions",
            "split",
            "text",
            "digit_label",
            "color_label",
            "shape_label",
            "size_label",
            "reg_to_attr",
            "attributes",
        ],
    )
    return table, filepaths


def check_disk_space(root: Path, pairs: int, target: int) -> None:
    """Refuse budgets whose images cannot fit on the disk (at least ``pairs / target`` images of ~1.5 KB each)."""
    min_images = pairs // max(target, 1)
    need = min_images * PNG_BYTES
    free = shutil.disk_usage(root).free
    if need > free:
        raise VillaError(
            f"budgets of {pairs:.3g} pairs need at least {min_images:.3g} images (~{need / 2**30:.3g} GiB of PNGs) but "
            f"{root} has {free / 2**30:.1f} GiB free; lower --attribute_budget / --val_budget / --test_budget"
        )


def dataset_name(budget: int, complexity: float) -> str:
    return f"docmnist_{budget}_{complexity:.1f}"


def generate(
    attribute_budget: int = 30000,
    target_sample_complexity: int = 16,
    seed: int = 23,
    out_dir: Optional[str] = None,
    mnist_dir: Optional[str] = None,
    val_budget: int = 10000,
    test_budget: int = 10000,
    overwrite: bool = False,
    download: bool = False,
    workers: Optional[int] = None,
    chunk_images: int = 256,
    vocab: Optional[Vocabulary] = None,
    progress: bool = True,
    train_images: Optional[int] = None,
    val_images: Optional[int] = None,
) -> Path:
    """Generate a DocMNIST dataset folder and return its path (``<out_dir>/docmnist_{budget}_{complexity:.1f}``).

    ``train_images`` / ``val_images``: that many images in the split instead of its attribute budget (the
    complexity experiment's fixed-images control; the folder is ``docmnist_{images}img_{complexity:.1f}``)."""
    if not 2 <= target_sample_complexity <= MAX_COMPLEXITY:
        raise VillaError(
            f"--target_sample_complexity={target_sample_complexity}: must be in 2..{MAX_COMPLEXITY} (a region has "
            f"2 to 4 attributes and an image at most {GRID * GRID} regions)"
        )
    if workers is not None and workers < 1:
        raise VillaError(f"--workers={workers}: must be >= 1 (threads encoding PNGs)")
    for flag, n in (("train_images", train_images), ("val_images", val_images)):
        if n is not None and n < 1:
            raise VillaError(f"--{flag}={n}: must be >= 1 image")
    for flag, b in (("attribute_budget", attribute_budget), ("val_budget", val_budget), ("test_budget", test_budget)):
        if b < 1:
            raise VillaError(f"--{flag}={b}: must be >= 1 region-attribute pair")
    root = Path(out_dir) if out_dir else data_root()
    check_disk_space(check_writable(root), attribute_budget + val_budget + test_budget, target_sample_complexity)
    t0 = time.perf_counter()
    vocab = vocab or load_vocab("docmnist")
    pools: DigitPools = load_digit_pools(mnist_dir, download=download)
    n_templates = [len(vocab.templates[vocab.groups.index(g)]) for g in ("digit", "color", "shape", "size")]
    budgets = {"train": attribute_budget, "val": val_budget, "test": test_budget}
    fixed = {"train": train_images, "val": val_images, "test": None}
    layouts = []
    for si, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, si])
        lay = draw_layout(
            rng, split, len(pools.images[split]), target_sample_complexity, budgets[split], n_templates, fixed[split]
        )
        lay.digit = pools.labels[split][lay.pool_index]
        if lay.n_images == 0:
            flag = "attribute_budget" if split == "train" else f"{split}_budget"
            raise VillaError(f"--{flag}={budgets[split]} too small: no {split} image fits (each image has >= 2 pairs)")
        layouts.append(lay)
    complexity = {lay.split: float(lay.pairs.sum() / lay.n_images) for lay in layouts}
    final = root / (
        f"docmnist_{train_images}img_{complexity['train']:.1f}"
        if train_images is not None
        else dataset_name(attribute_budget, complexity["train"])
    )
    if final.exists() and not overwrite:
        raise VillaError(f"output folder {final} exists; pass --overwrite to replace it or choose another --out_dir")
    first_ids = list(np.cumsum([0] + [lay.n_images for lay in layouts[:-1]]))
    table, filepaths = build_table(layouts, vocab, [int(f) for f in first_ids])
    rgb = np.array([vocab.extra["docmnist"]["color_rgb"][c] for c in vocab.group_attributes("color")], np.uint8)
    bank = shape_mask_bank(vocab)
    n_total = sum(lay.n_images for lay in layouts)
    workers = workers or min(8, os.cpu_count() or 1)
    with atomic_dir(final, overwrite=overwrite) as tmp, ThreadPoolExecutor(workers) as ex:
        # Worker threads render and write chunks of images while this thread writes the annotations.
        tasks = []
        for lay, paths in zip(layouts, filepaths):
            (tmp / "images" / lay.split).mkdir(parents=True, exist_ok=True)
            pool = pools.images[lay.split]
            for s in range(0, lay.n_images, chunk_images):
                e = min(s + chunk_images, lay.n_images)
                tasks.append(ex.submit(_write_chunk, lay, pool, rgb, bank, paths, tmp, s, e))
        write_feather(table, tmp / "annotations.feather")
        with tqdm(total=n_total, desc="docmnist images", unit="img", disable=not progress) as bar:
            for task in as_completed(tasks):
                bar.update(task.result())
        info = {
            "generator": "villa docmnist",
            "args": {
                "attribute_budget": attribute_budget,
                "target_sample_complexity": target_sample_complexity,
                "val_budget": val_budget,
                "test_budget": test_budget,
                "seed": seed,
                **({"train_images": train_images} if train_images is not None else {}),
                **({"val_images": val_images} if val_images is not None else {}),
            },
            "mnist_source": pools.source,
            "mnist_full": pools.full,
            "splits": {
                lay.split: {
                    "images": int(lay.n_images),
                    "regions": int(lay.n_regions.sum()),
                    "pairs": int(lay.pairs.sum()),
                    "sample_complexity": round(complexity[lay.split], 4),
                    "digit_pool": int(len(pools.images[lay.split])),
                }
                for lay in layouts
            },
            # which MNIST digits each split drew from: compare datasets with docmnist.mnist.pools_overlap
            "digit_pools": {lay.split: pools.info[lay.split].to_dict() for lay in layouts},
        }
        (tmp / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    secs = time.perf_counter() - t0
    for lay in layouts:
        s = info["splits"][lay.split]
        log.info(
            "%s: %d images, %d regions, %d pairs, sample complexity %.2f",
            lay.split,
            s["images"],
            s["regions"],
            s["pairs"],
            s["sample_complexity"],
        )
    log.info("wrote %s (%d images in %.1fs, %.0f images/s)", final, n_total, secs, n_total / secs)
    return final


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate DocMNIST (images + annotations.feather).")
    p.add_argument("--attribute_budget", type=int, default=30000, help="region-attribute pairs in the train split")
    p.add_argument("--target_sample_complexity", type=int, default=16, help="max region-attribute pairs per image")
    p.add_argument("--val_budget", type=int, default=10000)
    p.add_argument("--test_budget", type=int, default=10000)
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--train_images", type=int, default=None, help="exactly this many train images (not a budget)")
    p.add_argument("--val_images", type=int, default=None, help="exactly this many val images (not a budget)")
    p.add_argument("--out_dir", default=None, help="parent folder of the dataset (default: $VILLA_DATA_DIR or data)")
    p.add_argument("--mnist_dir", default=None, help="MNIST folder (IDX files or torchvision's MNIST/raw)")
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch MNIST into --mnist_dir first (MNIST found nowhere is fetched anyway)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--workers", type=int, default=None, help="threads encoding PNGs (default: cores, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> Path:
    setup_logging()
    a = build_parser().parse_args(argv)
    return generate(
        attribute_budget=a.attribute_budget,
        target_sample_complexity=a.target_sample_complexity,
        seed=a.seed,
        out_dir=a.out_dir,
        mnist_dir=a.mnist_dir,
        val_budget=a.val_budget,
        test_budget=a.test_budget,
        train_images=a.train_images,
        val_images=a.val_images,
        overwrite=a.overwrite,
        download=a.download,
        workers=a.workers,
        progress=not a.quiet,
    )


if __name__ == "__main__":
    main()
