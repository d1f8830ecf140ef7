"""What every benchmark shares: the machine's name (for the tables) and saving results as JSON."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """``NVIDIA H100 80GB HBM3`` on a GPU, else the CPU model and core count (lscpu)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or "cpu"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def save_result(name: str, obj: dict) -> Path:
    """bench/results/<name>.json, written atomically."""
    from megatron_a3po.io import write_json_atomic

    path = RESULTS / f"{name}.json"
    write_json_atomic(path, obj)
    return path



def parse_args(argv, description: str | None = None, *, prog: str | None = None, helps: dict | None = None,
               **defaults):
    """A benchmark's flags from its defaults: ``--name-with-dashes`` per keyword, typed as its default
    (a bool is a switch that turns it on; None takes a string), with optional help texts by keyword."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=description)
    for key, default in defaults.items():
        flag, text = "--" + key.replace("_", "-"), (helps or {}).get(key)
        if isinstance(default, bool):
            ap.add_argument(flag, action="store_true", default=default, help=text)
        else:
            ap.add_argument(flag, type=str if default is None else type(default), default=default, help=text)
    return ap.parse_args(argv)
