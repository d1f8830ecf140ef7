"""``python -m tools.convert_ckpt``: see cli.py (rank functions live there so spawned ranks can import them)."""

import sys

from tools.convert_ckpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
