"""python -m tools.simcluster --recipe NAME [--ranks 0,7] [--seq-len N] [--n-mb N] [--json OUT]

Runs in a child process that loads the simulated CUDA device before torch (megatron_a3po.platform.sim).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from tools.simcluster.cli import main

    sys.exit(main())
