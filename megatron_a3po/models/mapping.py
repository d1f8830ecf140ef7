"""How one Megatron (local-spec) parameter maps to HF tensors: the declarative rules of a family's table.

A family (megatron_a3po/models/families/qwen2.py, ...) is a table ``megatron local-spec name -> rule``;
per-layer names use ``{i}`` for the global layer index in HF names. Rules:

  Replicated(hf)      same tensor on every TP rank (norms)
  Split(hf, dim)      contiguous TP chunks along ``dim`` (o_proj/down_proj: dim 1)
  Vocab(hf)           rows padded with zeros to the padded vocab, then TP chunks along dim 0
  QKV(q, k, v)        rows grouped per KV group g: [q heads of g | k_g | v_g], then TP chunks along dim 0
                      (a group never straddles ranks: TP divides the KV heads)
  GateUp(gate, up)    TP rank i holds cat[gate.chunk(TP)[i]; up.chunk(TP)[i]]

They live with the models because they describe the model's parameters; the tensor arithmetic that
applies them (shard / unshard at any TP) is megatron_a3po.convert.rules, one layer up.
TransformerEngine's fused names are folded onto local-spec names by ``local_name``.
"""

from __future__ import annotations

from dataclasses import dataclass

# TE layer spec fuses the pre-attention / pre-MLP norms into the following linear layer
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def local_name(suffix: str) -> str:
    return TE_ALIASES.get(suffix, suffix)


@dataclass(frozen=True)
class Replicated:
    hf: str

    def names(self):
        return (self.hf,)


@dataclass(frozen=True)
class Split:
    hf: str
    dim: int

    def names(self):
        return (self.hf,)


@dataclass(frozen=True)
class Vocab:
    hf: str
    tied_fallback: str | None = None  # for the output layer of tied models: read the embedding instead

    def names(self):
        return (self.hf,)


@dataclass(frozen=True)
class QKV:
    q: str
    k: str
    v: str

    def names(self):
        return (self.q, self.k, self.v)


@dataclass(frozen=True)
class GateUp:
    gate: str
    up: str

    def names(self):
        return (self.gate, self.up)


def fill(rule, i: int | None):
    """The rule with ``{i}`` replaced by the global layer index."""
    if i is None:
        return rule
    kw = {k: (v.format(i=i) if isinstance(v, str) else v) for k, v in rule.__dict__.items()}
    return type(rule)(**kw)
