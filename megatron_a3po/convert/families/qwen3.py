"""Qwen3: per-head RMSNorm on queries and keys (q_norm / k_norm), no q/k/v biases."""
from megatron_a3po.convert.families import Family, dense_layer_table

FAMILY = Family("qwen3", dense_layer_table(qkv_bias=False, qk_norm=True))
