"""``python -m villa.stage1``: the command line of villa/stage1/train.py."""

from villa.stage1.train import main

if __name__ == "__main__":
    main()
