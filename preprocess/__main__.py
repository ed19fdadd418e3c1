"""Embed any dataset that follows docs/data_format.md with a frozen open_clip encoder.

    python -m preprocess data_dir=path/to/dataset dataset=path/to/vocab.yaml model.name=RN50 model.pretrained=openai
    torchrun --nproc_per_node=N -m preprocess data_dir=...      # the images sharded over N processes

The keys are the stages' (``model.name``, ``model.pretrained``, ``dataset=``...; ``--help`` lists them). The
original's flags (``--data_dir=... --model=... --pretrained=...``) are read too, and errors then speak in flags.
"""

from __future__ import annotations

from typing import Optional, Sequence

# The original's argparse flags (``python preprocess/preprocess_docmnist.py --data_dir=...``) as villa's keys.
LEGACY_FLAGS = {
    "--data_dir": "data_dir",
    "--dataset_config": "dataset",
    "--model": "model.name",
    "--pretrained": "model.pretrained",
    "--input_size": "model.input_size",
    "--batch_size": "batch_size",
    "--device": "device",
    "--num_workers": "num_workers",
    "--dtype": "dtype",
    "--out_dir": "out_dir",
    "--seed": "seed",
    "--splits": "splits",
}
LEGACY_SWITCHES = {"--normalize": "model.normalize=true", "--quiet": "progress=false"}


def legacy_overrides(argv: Sequence[str]) -> Optional[list[str]]:
    """``--data_dir=X --model RN50 --quiet`` as ``data_dir=X model.name=RN50 progress=false``; None when ``argv``
    uses no legacy flag (then it is villa's ``key=value`` form as it is)."""
    if not any(a.split("=")[0] in LEGACY_FLAGS or a in LEGACY_SWITCHES for a in argv):
        return None
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        flag, eq, value = a.partition("=")
        if a in LEGACY_SWITCHES:
            out.append(LEGACY_SWITCHES[a])
        elif flag in LEGACY_FLAGS:
            if not eq:  # --flag value [value ...] (--splits takes several)
                values = []
                while i + 1 < len(argv) and not argv[i + 1].startswith("-") and (not values or flag == "--splits"):
                    values.append(argv[i + 1])
                    i += 1
                value = ",".join(values)
            key = LEGACY_FLAGS[flag]
            out.append(f"{key}=[{value}]" if key == "splits" else f"{key}={value}")
        else:
            out.append(a)
        i += 1
    return out


def legacy_spelling(message: str) -> str:
    """An error about a key, in the flag spelling of the original's command (``batch_size=0`` -> ``--batch_size=0``)."""
    for flag, key in LEGACY_FLAGS.items():
        message = message.replace(f"{key}=", f"{flag}=")
    return message


def main(default_dataset: Optional[str] = None) -> None:
    """``python -m preprocess key=value ...`` (villa's keys, as the stages take them) or the original's flags."""
    import sys

    from villa.core.config import hydra_entry

    legacy = legacy_overrides(sys.argv[1:])
    if legacy is not None:
        if default_dataset and not any(o.startswith("dataset=") for o in legacy):
            legacy.append(f"dataset={default_dataset}")
        sys.argv = sys.argv[:1] + legacy
    spell = legacy_spelling if legacy is not None else None
    hydra_entry("preprocess", "villa.preprocess:run_preprocess", __doc__, spell=spell)()


if __name__ == "__main__":
    main()
