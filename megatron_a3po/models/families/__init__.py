"""One file per model family: a declarative table from Megatron (local spec) names to HF tensors.

A family module defines ``FAMILY = Family(...)``: its name (the HF ``model_type``), the HF architecture
names it serves, and its attention variants. ``registry()`` finds every module of this package, so adding
a family is one new file here: the model builder, converters, weight export and CLI pick it up.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

from megatron_a3po.models.mapping import GateUp, QKV, Replicated, Split, Vocab

L = "model.layers.{i}."


def dense_layer_table(*, qkv_bias: bool, qk_norm: bool) -> dict:
    """The per-layer table shared by Llama-style dense decoders (Qwen2, Llama 3, Qwen3)."""
    t = {
        "input_layernorm.weight": Replicated(L + "input_layernorm.weight"),
        "self_attention.linear_qkv.weight": QKV(L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight",
                                                L + "self_attn.v_proj.weight"),
        "self_attention.linear_proj.weight": Split(L + "self_attn.o_proj.weight", dim=1),
        "pre_mlp_layernorm.weight": Replicated(L + "post_attention_layernorm.weight"),
        "mlp.linear_fc1.weight": GateUp(L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
        "mlp.linear_fc2.weight": Split(L + "mlp.down_proj.weight", dim=1),
    }
    if qkv_bias:
        t["self_attention.linear_qkv.bias"] = QKV(L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias",
                                                  L + "self_attn.v_proj.bias")
    if qk_norm:
        t["self_attention.q_layernorm.weight"] = Replicated(L + "self_attn.q_norm.weight")
        t["self_attention.k_layernorm.weight"] = Replicated(L + "self_attn.k_norm.weight")
    return t


GLOBAL_TABLE = {
    "embedding.word_embeddings.weight": Vocab("model.embed_tokens.weight"),
    "decoder.final_layernorm.weight": Replicated("model.norm.weight"),
    "output_layer.weight": Vocab("lm_head.weight", tied_fallback="model.embed_tokens.weight"),
}


@dataclass(frozen=True)
class Family:
    name: str                           # also the HF config's model_type
    architectures: tuple[str, ...]      # HF config.architectures served by this family
    qkv_bias: bool | None = None        # None: the config's ``attention_bias`` decides
    qk_norm: bool = False
    make_layer_table: Callable[..., dict] = dense_layer_table
    global_table: dict = field(default_factory=lambda: dict(GLOBAL_TABLE))

    def has_qkv_bias(self, hf_config) -> bool:
        return self.qkv_bias if self.qkv_bias is not None else bool(getattr(hf_config, "attention_bias", False))

    def layer_table(self, arch) -> dict:
        """Megatron layer-parameter suffix -> rule, for a model of this family with ``arch``'s variants."""
        return self.make_layer_table(qkv_bias=arch.qkv_bias, qk_norm=arch.qk_norm)


@functools.cache
def registry() -> dict[str, Family]:
    """Every family defined in this package, by name."""
    out = {}
    for m in pkgutil.iter_modules(__path__):
        fam = getattr(importlib.import_module(f"{__name__}.{m.name}"), "FAMILY", None)
        if isinstance(fam, Family):
            out[fam.name] = fam
    return out


def get_family(name: str) -> Family:
    return registry()[name]
