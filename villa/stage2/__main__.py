"""``python -m villa.stage2``: the command line of villa/stage2/train.py."""

from villa.stage2.train import main

if __name__ == "__main__":
    main()
