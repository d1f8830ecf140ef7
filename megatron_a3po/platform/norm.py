"""``RMSNorm``: torch's RMSNorm behind megatron's norm interface, usable with sequence parallelism.

The local layer spec (no TransformerEngine: every CPU, and a GPU without TE) builds its norms with
megatron's ``WrappedTorchNorm``, which refuses ``sequence_parallel``. Under sequence parallelism each TP
rank normalises only its slice of the sequence, so the norm weight's gradient is partial per rank:
this class marks the weight ``sequence_parallel`` (as TE's and apex's norms do), and megatron's
``finalize_model_grads`` all-reduces such gradients over the TP group.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"RMSNorm: config.normalization={config.normalization!r}")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
