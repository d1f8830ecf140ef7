"""Fused kernels (plain PyTorch): log-probs + entropy from vocab-sharded logits."""

from megatron_a3po.ops.logprobs import vocab_parallel_logprobs_entropy

__all__ = ["vocab_parallel_logprobs_entropy"]
