"""Llama 3 / 3.1: GQA, q/k/v biases only if the config says attention_bias; rope scaling lives in the
model builder, not in the weights."""
from megatron_a3po.models.families import Family

FAMILY = Family("llama", ("LlamaForCausalLM",))
