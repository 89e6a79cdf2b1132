"""``python -m padless.train ...``: the same command line as the ``train`` console script."""

import os
import sys

if __name__ == "__main__":
    # `python -m` puts the working directory first on sys.path (the console script does not), where a user's own
    # kernels/ folder or train.py would shadow the libraries padless imports (transformers imports Hugging Face's
    # `kernels`). Drop it before anything else is imported.
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    from padless.train.cli import main

    main(prog_name="train")
