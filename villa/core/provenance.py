"""What a run was trained on, so that results can be trusted: digit pools for held-out checks, and the run
fingerprint that decides whether a checkpoint may be resumed.

- **Digit pools.** DocMNIST records each split's digit pool in ``generation.json`` (docmnist/mnist.py); every
  Stage 2 / pretraining checkpoint records ``data_pools``: the pools of the train and val splits it trained on, plus
  those recorded in the checkpoint it started from. :func:`check_held_out` refuses evaluation data whose test
  pool shares a digit with any of them.
- **Run fingerprint.** :func:`run_fingerprint` is what a run depends on (the data's identity by content hash, the
  starting weights, and every config key that shapes training except the ones listed in ``RESUME_FREE``).
  :func:`check_resume` continues a checkpoint only when it matches, else stops with one line naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from docmnist.mnist import pools_overlap
from villa.core.errors import VillaError
from villa.core.io import PathLike

log = logging.getLogger(__name__)

# Config keys that may change when a run is resumed (they do not change what an epoch computes): epochs (train
# further), where things are written or read from (their contents are fingerprinted instead), and runtime knobs.
RESUME_FREE = {
    "epochs",
    "resume",
    "progress",
    "device",
    "num_workers",
    "image_cache",
    "log_every",
    "compile",
    "compile_backend",
    "checkpoint_every",
    "checkpoint_minutes",
    "val_every",
    "task_name",
    "checkpoint_dir",
    "logger",
    "wandb",
    "data_dir",
    "embeddings_dir",
    "mapping_path",
    "paths",
    "hydra",
    # Stage 1's assignment rule and mapping pass run after training: changing them re-maps without retraining
    "epsilon",
    "sentence_choice",
    "region_text",
    "mapping_amp",
    "mapping_batch_regions",
}


def file_sha256(path: PathLike, chars: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:chars]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _cache_home() -> Path:
    from villa.core.env import cache_dir

    return cache_dir()


def images_digest(root: PathLike, filepaths: list[str], workers: int = 8) -> str:
    """One digest of a dataset's image files' contents (sha256 of each file, in row order). Each file's hash is
    cached by path, size and mtime (``$VILLA_CACHE_DIR``, default ``~/.cache/villa``), so only new or changed files
    are read again; a cache that cannot be read or written is rebuilt or skipped, never an error."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    root = Path(root).resolve()
    cache_file = _cache_home() / "image_digests" / (hashlib.sha256(str(root).encode()).hexdigest()[:16] + ".json")
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    stats = []
    for p in filepaths:
        st = os.stat(root / p)
        stats.append((p, st.st_size, st.st_mtime_ns))
    todo = [p for p, size, mtime in stats if cache.get(p, [None, None])[:2] != [size, mtime]]
    with ThreadPoolExecutor(max(1, workers)) as ex:
        hashes = dict(zip(todo, ex.map(lambda q: file_sha256(root / q), todo)))
    for p, size, mtime in stats:
        if p in hashes:
            cache[p] = [size, mtime, hashes[p]]
    if todo:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            from villa.core.io import write_text_atomic

            write_text_atomic(cache_file, json.dumps(cache))
        except (OSError, VillaError):
            pass
    h = hashlib.sha256()
    for p, _, _ in stats:
        h.update(f"{p}\0{cache[p][2]}\n".encode())
    return h.hexdigest()[:16]


def run_fingerprint(cfg: DictConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs``: the identities of what the run reads (content hashes), e.g. {"annotations": "ab12..."}."""
    conf = OmegaConf.to_container(cfg, resolve=True)
    flat = {k: v for k, v in _flat(conf).items() if k.split(".")[0] not in RESUME_FREE}
    return {"inputs": dict(inputs), "config": flat}


def check_resume(saved: Optional[dict[str, Any]], now: dict[str, Any], checkpoint: Path) -> None:
    """Continue ``checkpoint`` only if it was written by the same run (same fingerprint)."""
    ways_out = "use a new checkpoint_dir, or resume=false to start over"
    if saved is None:
        raise VillaError(f"{checkpoint} records no run fingerprint (an older villa wrote it); {ways_out}")
    diffs = []
    for part in ("inputs", "config"):
        a, b = saved.get(part, {}), now.get(part, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}")
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise VillaError(f"{checkpoint} is from another run ({shown}); {ways_out}")


# --- digit pools ----------------------------------------------------------------------------------------------


def dataset_pools(data_dir: PathLike, splits: Iterable[str]) -> list[dict[str, Any]]:
    """The digit pools (``PoolInfo`` records) of ``splits`` of a DocMNIST folder; [] for data without a record."""
    gen = Path(data_dir) / "generation.json"
    if not gen.is_file():
        return []
    pools = json.loads(gen.read_text()).get("digit_pools", {})
    return [pools[s] for s in splits if s in pools]


def checkpoint_pools(pretrained: Optional[str]) -> Optional[list[dict[str, Any]]]:
    """The digit pools a starting encoder was trained on: ``[]`` for no weights or an open_clip tag (no DocMNIST
    digits), the recorded list for a villa checkpoint, ``None`` for a checkpoint that records nothing."""
    from villa.core.env import resolve_weights

    pretrained = resolve_weights(pretrained)
    if pretrained in (None, "none") or not Path(pretrained).is_file():
        return []
    from villa.core.checkpoint import load_checkpoint

    try:
        state = load_checkpoint(pretrained, "pretrained checkpoint")
    except VillaError:  # not a checkpoint dict villa can read (e.g. TorchScript): nothing is recorded
        return None
    return state.get("data_pools")


def unique_pools(pools: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for p in pools:
        if p["fingerprint"] not in seen:
            seen.add(p["fingerprint"])
            out.append(p)
    return out


def check_held_out(eval_dir: PathLike, trained: dict[str, Optional[list[dict[str, Any]]]]) -> dict[str, Any]:
    """Refuse ``eval_dir``'s test split if its digit pool shares digits with any pool in ``trained`` (what trained
    -> its pools; ``None``: unrecorded, a warning). Returns the test pool and the checked sources."""
    test = dataset_pools(eval_dir, ["test"])
    if not test:
        raise VillaError(
            f"{eval_dir}/generation.json records no test digit pool (an older generator wrote it); regenerate the data"
        )
    checked = {}
    for what, pools in trained.items():
        if pools is None:
            log.warning("%s records no training digit pools: cannot check that the test digits are held out", what)
            checked[what] = "unrecorded"
            continue
        shared = sum(pools_overlap(test[0], p) for p in pools)
        if shared:
            raise VillaError(
                f"the test split of {eval_dir} shares {shared} of its {test[0]['digits']} digits with what trained "
                f"{what}; generate the evaluation data and the training data from disjoint pools (docs/docmnist.md)"
            )
        checked[what] = 0
    return {"test_pool": test[0], "overlap": checked}
