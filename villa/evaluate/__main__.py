"""``python -m villa.evaluate``: the command line of villa/evaluate/retrieval.py."""

from villa.evaluate.retrieval import main

if __name__ == "__main__":
    main()
