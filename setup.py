"""villa: ViLLA (Varma et al., ICCV 2023) reimplemented, fast on one GPU."""

from setuptools import find_packages, setup

setup(
    name="villa",
    version="0.1.0",
    description="Fine-grained vision-language representation learning from complex image-text data (ViLLA)",
    python_requires=">=3.9",
    packages=find_packages(include=["villa", "villa.*", "docmnist", "docmnist.*", "preprocess", "preprocess.*"])
    + ["villa.configs"],
    # The Hydra configs live at the top level (configs/) as users of the original expect; they are shipped
    # inside the package as villa/configs so that a non-editable install finds them too.
    package_dir={"villa.configs": "configs"},
    package_data={"villa": ["models/configs/*.json", "assets/*.pt"], "villa.configs": ["*.yaml", "**/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "open_clip_torch>=2.24",
        "pandas>=2.0",
        "pyarrow>=14",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-image>=0.21",
        "pyyaml>=6",
        "pycocotools>=2.0.6",
    ],
    extras_require={
        "track": ["tensorboard>=2.14", "wandb>=0.17"],
        # ARO's COCO-Order / Flickr30k-Order perturbations (then: python -m spacy download en_core_web_sm;
        # python -m nltk.downloader punkt_tab)
        "aro": ["spacy>=3.4", "nltk>=3.8"],
        "dev": [
            "pytest>=7",
            "pytest-xdist>=3",
            "ruff>=0.5",
            "nbclient>=0.8",
            "nbformat>=5",
            "ipykernel>=6",
            "tensorboard>=2.14",
            "wandb>=0.17",
            "spacy>=3.4",
            "nltk>=3.8",
        ],
    },
)
