"""``python -m padless.prep ...``: the same command line as the ``prep`` console script."""

from padless.prep.cli import main

if __name__ == "__main__":
    main(prog_name="prep")
