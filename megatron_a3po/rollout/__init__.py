"""Rollout side of the asynchronous RL loop: fleet client, staleness-bounded controller, weight sync,
prompt data and rewards. The trainer uses ``RolloutManager`` (manager.py) only.
"""

import importlib

# name -> module; imported on first use, so that importing one submodule (a task's reward module in a
# reward worker process, rewards.py) does not import the whole rollout stack (httpx, torch)
_EXPORTS = {"RolloutManager": "manager", "ControllerConfig": "controller", "RolloutError": "controller",
            "WeightUpdateError": "sync", "Batch": "types", "Sample": "types", "group_advantages": "types",
            "DiskTransport": "weights", "NcclTransport": "weights", "TensorTransport": "weights"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
