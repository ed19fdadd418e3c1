"""Embed a DocMNIST dataset, as the original README: ``python preprocess/preprocess_docmnist.py --data_dir=docmnist_30000_15.2``
(the dataset config defaults to DocMNIST's; villa's ``key=value`` form works too)."""

from preprocess.__main__ import main

if __name__ == "__main__":
    main(default_dataset="docmnist")
