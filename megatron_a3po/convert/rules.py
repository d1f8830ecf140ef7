"""Applying a family's mapping rules (megatron_a3po.models.mapping) to tensors, at any tensor-parallel size.

``shard(rule, hf, tp_rank, tp, arch)`` -> this rank's tensor; ``unshard(rule, shards, arch)`` -> {hf: tensor};
``hf_shapes(rule, arch)`` -> the HF shapes a rule expects.
"""

from __future__ import annotations

import torch

from megatron_a3po.models.mapping import GateUp, QKV, Replicated, Split, TE_ALIASES, Vocab, fill, local_name  # noqa: F401

def _qkv_full(q, k, v, arch):
    g, r, d = arch.num_kv_heads, arch.num_heads // arch.num_kv_heads, arch.head_dim
    tail = q.shape[1:]
    q = q.reshape(g, r * d, *tail)
    k = k.reshape(g, d, *tail)
    v = v.reshape(g, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(g * (r + 2) * d, *tail)


def shard(rule, get, tp_rank: int, tp: int, arch, padded_vocab: int) -> torch.Tensor:
    """This TP rank's tensor for ``rule``; ``get(name)`` returns the HF tensor."""
    if isinstance(rule, Replicated):
        return get(rule.hf)
    if isinstance(rule, Split):
        return get(rule.hf).chunk(tp, dim=rule.dim)[tp_rank]
    if isinstance(rule, Vocab):
        w = get(rule.hf)
        if w.shape[0] != arch.vocab_size:
            raise ValueError(f"{rule.hf} has {w.shape[0]} rows but the config's vocab_size is {arch.vocab_size}")
        pad = torch.zeros((padded_vocab - w.shape[0], *w.shape[1:]), dtype=w.dtype)
        return torch.cat([w, pad]).chunk(tp, dim=0)[tp_rank]
    if isinstance(rule, QKV):
        return _qkv_full(get(rule.q), get(rule.k), get(rule.v), arch).chunk(tp, dim=0)[tp_rank]
    if isinstance(rule, GateUp):
        gate, up = get(rule.gate), get(rule.up)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]])
    raise TypeError(f"unknown rule {rule!r}")


def unshard(rule, shards: list[torch.Tensor], arch) -> dict[str, torch.Tensor]:
    """Full HF tensors from the TP shards (rank order) of one Megatron parameter."""
    if isinstance(rule, Replicated):
        return {rule.hf: shards[0]}
    if isinstance(rule, Split):
        return {rule.hf: torch.cat(shards, dim=rule.dim)}
    if isinstance(rule, Vocab):
        return {rule.hf: torch.cat(shards, dim=0)[: arch.vocab_size]}
    if isinstance(rule, QKV):
        full = torch.cat(shards, dim=0)
        g, r, d = arch.num_kv_heads, arch.num_heads // arch.num_kv_heads, arch.head_dim
        tail = full.shape[1:]
        x = full.reshape(g, (r + 2) * d, *tail)
        q, k, v = x.split([r * d, d, d], dim=1)
        return {rule.q: q.reshape(g * r * d, *tail), rule.k: k.reshape(g * d, *tail),
                rule.v: v.reshape(g * d, *tail)}
    if isinstance(rule, GateUp):
        halves = [s.chunk(2, dim=0) for s in shards]
        return {rule.gate: torch.cat([h[0] for h in halves]), rule.up: torch.cat([h[1] for h in halves])}
    raise TypeError(f"unknown rule {rule!r}")


def hf_shapes(rule, arch) -> dict[str, tuple[int, ...]]:
    """Expected HF shapes of the tensors of ``rule`` (every rank can compute them without data)."""
    H, d, nq, nkv, F = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, arch.intermediate_size
    out = {}
    for n in rule.names():
        if n.endswith("q_proj.weight"):
            out[n] = (nq * d, H)
        elif n.endswith(("k_proj.weight", "v_proj.weight")):
            out[n] = (nkv * d, H)
        elif n.endswith("q_proj.bias"):
            out[n] = (nq * d,)
        elif n.endswith(("k_proj.bias", "v_proj.bias")):
            out[n] = (nkv * d,)
        elif n.endswith("o_proj.weight"):
            out[n] = (H, nq * d)
        elif n.endswith(("gate_proj.weight", "up_proj.weight")):
            out[n] = (F, H)
        elif n.endswith("down_proj.weight"):
            out[n] = (H, F)
        elif n.endswith(("q_norm.weight", "k_norm.weight")):
            out[n] = (d,)
        elif n.endswith("norm.weight") or n.endswith("layernorm.weight"):
            out[n] = (H,)
        elif n.endswith(("embed_tokens.weight", "lm_head.weight")):
            out[n] = (arch.vocab_size, H)
        else:
            raise KeyError(f"no shape rule for HF tensor {n}")
    return out
