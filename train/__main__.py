"""``python -m padless.train ...``: the same command line as the ``train`` console script."""

from padless.train.cli import main

if __name__ == "__main__":
    main(prog_name="train")
