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

