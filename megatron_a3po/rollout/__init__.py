"""Rollout side of the asynchronous RL loop: fleet client, staleness-bounded controller, weight sync,
prompt data and rewards. The trainer uses ``RolloutManager`` (manager.py) only.
"""

from megatron_a3po.rollout.controller import ControllerConfig, RolloutError, WeightUpdateError
from megatron_a3po.rollout.manager import RolloutManager
from megatron_a3po.rollout.types import Batch, Sample, group_advantages
from megatron_a3po.rollout.weights import DiskTransport, NcclTransport, TensorTransport

__all__ = ["RolloutManager", "ControllerConfig", "Batch", "Sample", "group_advantages", "DiskTransport",
           "NcclTransport", "TensorTransport", "RolloutError", "WeightUpdateError"]
