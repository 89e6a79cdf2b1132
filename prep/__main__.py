"""``python -m prep`` runs the ``prep`` command line (for environments where the package is not installed)."""

from prep.cli import main

main(prog_name="prep")
