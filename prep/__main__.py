"""``python -m padless.prep ...``: the same command line as the ``prep`` console script."""

import os
import sys

if __name__ == "__main__":
    # `python -m` puts the working directory first on sys.path (the console script does not), where a user's own
    # kernels/ folder or prep.py would shadow the libraries padless imports (transformers imports Hugging Face's
    # `kernels`). Drop it before anything else is imported.
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    from padless.prep.cli import main

    main(prog_name="prep")
