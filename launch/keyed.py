"""``python -m launch.keyed MODULE ARGS...``: run ``python -m MODULE ARGS... --api-key $A3PO_API_KEY``.

SGLang's server and router take their key only as a flag, and a flag is visible to every user in
``ps``. This wrapper adds it to ``sys.argv`` inside the process (``/proc/PID/cmdline`` keeps the
command without it) and runs the module as ``__main__``.
"""

from __future__ import annotations

import os
import runpy
import sys

from megatron_a3po.platform.keys import API_KEY_ENV


def keyed_command(cmd: list[str]) -> list[str]:
    """``[python, -m, MODULE, *args]`` -> the same through this wrapper, when the run has a key."""
    if not os.environ.get(API_KEY_ENV) or len(cmd) < 3 or cmd[1] != "-m":
        return cmd
    return [cmd[0], "-m", "launch.keyed", *cmd[2:]]


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m launch.keyed MODULE [ARGS...]")
    key = os.environ.get(API_KEY_ENV)
    if not key:
        raise SystemExit(f"launch.keyed: ${API_KEY_ENV} is not set")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:], "--api-key", key]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
