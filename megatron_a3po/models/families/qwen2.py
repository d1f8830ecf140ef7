"""Qwen2 / Qwen2.5: q/k/v biases; the small models tie embeddings (handled by the Vocab fallback)."""
from megatron_a3po.models.families import Family

FAMILY = Family("qwen2", ("Qwen2ForCausalLM",), qkv_bias=True)
