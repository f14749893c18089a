"""``python -m livesnap.vhd ARGS``: the ``livesnap vhd`` command standalone."""
import sys

from livesnap.vhd.cli import main

if __name__ == "__main__":
    sys.exit(main())
