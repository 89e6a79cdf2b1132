"""``python -m train ...``: the same command line as the ``train`` console script."""

from train.cli import main

if __name__ == "__main__":
    main()
