"""megatron-a3po: asynchronous RL post-training with the A-3PO loss on Megatron-core."""

__version__ = "0.1.0"
