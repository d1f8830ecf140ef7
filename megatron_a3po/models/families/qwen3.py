"""Qwen3: per-head RMSNorm on queries and keys (q_norm / k_norm), no q/k/v biases."""
from megatron_a3po.models.families import Family

FAMILY = Family("qwen3", ("Qwen3ForCausalLM",), qkv_bias=False, qk_norm=True)
