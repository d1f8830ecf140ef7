"""Qwen2 / Qwen2.5: q/k/v biases; the small models tie embeddings (handled by the Vocab fallback)."""
from megatron_a3po.convert.families import Family, dense_layer_table

FAMILY = Family("qwen2", dense_layer_table(qkv_bias=True, qk_norm=False))
