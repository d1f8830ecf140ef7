"""Llama 3 / 3.1: no biases, GQA; rope scaling lives in the model builder, not in the weights."""
from megatron_a3po.convert.families import Family, dense_layer_table

FAMILY = Family("llama", dense_layer_table(qkv_bias=False, qk_norm=False))
