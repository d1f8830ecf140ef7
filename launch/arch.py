"""Model shapes the launcher checks layouts against, without downloading anything.

The architecture is megatron_a3po.models' ``Arch``, read by the same functions the trainer uses.
A recipe's architecture comes from, in order: ``model.tiny`` (the recipe itself), ``config.json`` in
``model.hf_path`` when that is a local directory, ``cluster.arch`` (a name below or a path to a
config.json), or the name at the end of ``model.hf_path`` looked up in ``KNOWN`` (case-insensitive).

``memory_estimate`` is the per-GPU arithmetic the GPU recipes quote in their comments: bf16 mixed
precision with Megatron's distributed optimizer, sequence parallelism, no activation recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_a3po.models import Arch, UnsupportedModel, arch_from_config_json, arch_from_hf, arch_of_model_cfg
from megatron_a3po.errors import A3POError


def _known(arch_name: str, heads, kv, layers, hidden, ffn, vocab, *, tie=False, bias=None, **kw) -> dict:
    """The fields of a published config.json that the layout and the memory estimate need."""
    d = dict(architectures=[arch_name], num_attention_heads=heads, num_key_value_heads=kv,
             num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn, vocab_size=vocab,
             tie_word_embeddings=tie, **kw)
    if bias is not None:
        d["attention_bias"] = bias
    return d


# Values from each model's published config.json, read through the same reader as any config.json
# (megatron_a3po.models.arch_from_hf), so the launcher and the trainer agree on every shape.
_Q = "Qwen2ForCausalLM"
_L = "LlamaForCausalLM"
_QWEN25 = dict(vocab=152064)
KNOWN: dict[str, dict] = {
    "qwen2.5-1.5b-instruct": _known(_Q, 12, 2, 28, 1536, 8960, 151936, tie=True),
    "qwen2.5-1.5b": _known(_Q, 12, 2, 28, 1536, 8960, 151936, tie=True),
    "qwen2.5-7b-instruct": _known(_Q, 28, 4, 28, 3584, 18944, **_QWEN25),
    "qwen2.5-7b": _known(_Q, 28, 4, 28, 3584, 18944, **_QWEN25),
    "qwen2.5-32b-instruct": _known(_Q, 40, 8, 64, 5120, 27648, **_QWEN25),
    "qwen2.5-32b": _known(_Q, 40, 8, 64, 5120, 27648, **_QWEN25),
    "meta-llama-3-70b-instruct": _known(_L, 64, 8, 80, 8192, 28672, 128256),
    "meta-llama-3-70b": _known(_L, 64, 8, 80, 8192, 28672, 128256),
    "llama-3.1-70b-instruct": _known(_L, 64, 8, 80, 8192, 28672, 128256),
    "llama-3.3-70b-instruct": _known(_L, 64, 8, 80, 8192, 28672, 128256),
}


def _from_known(d: dict, source: str) -> Arch:
    from transformers import AutoConfig

    model_type = {_Q: "qwen2", _L: "llama"}[d["architectures"][0]]
    return arch_from_hf(AutoConfig.for_model(model_type, **d), source=source)


def num_params(arch: Arch) -> int:
    """Parameters of a Llama/Qwen2-style decoder (biases and norms included approximately)."""
    h, f, kvd = arch.hidden_size, arch.intermediate_size, arch.num_kv_heads * arch.head_dim
    attn = h * h + 2 * h * kvd + h * h + (h + 2 * kvd)  # q, k, v, o (+ qkv bias)
    mlp = 3 * h * f
    per_layer = attn + mlp + 2 * h
    emb = arch.vocab_size * h * (1 if arch.tie_embeddings else 2)
    return arch.num_layers * per_layer + emb + h


class ArchError(A3POError, ValueError):
    pass


def _config_json(path) -> Arch:
    try:
        return arch_from_config_json(path, shape_only=True)
    except UnsupportedModel as e:
        raise ArchError(str(e)) from None


def _lookup(name: str, what: str) -> Arch:
    key = name.rstrip("/").split("/")[-1].lower()
    if key in KNOWN:
        return _from_known(KNOWN[key], f"launch/arch.py KNOWN[{key!r}] (from {what})")
    raise ArchError(
        f"unknown model architecture for {what}: not a local directory with config.json and "
        f"{key!r} is not in launch/arch.py KNOWN ({', '.join(sorted(KNOWN))}); "
        "set cluster.arch to a known name or to the path of the model's config.json")


def resolve_arch(recipe) -> Arch:
    m = recipe.model
    if m.tiny is not None:
        return arch_of_model_cfg(m)
    if m.hf_path and (Path(m.hf_path) / "config.json").is_file():
        return _config_json(Path(m.hf_path) / "config.json")
    arch = recipe.cluster.arch
    if arch:
        if arch.endswith(".json"):
            if not Path(arch).is_file():
                raise ArchError(f"cluster.arch={arch!r}: file not found")
            return _config_json(arch)
        return _lookup(arch, f"cluster.arch={arch!r}")
    if m.hf_path:
        return _lookup(m.hf_path, f"model.hf_path={m.hf_path!r}")
    raise ArchError(f"cannot tell the architecture of model.mcore_path={m.mcore_path!r}: set cluster.arch "
                    "to a name in launch/arch.py KNOWN or to the path of the model's config.json")


GPU_MEMORY_GB = 80.0  # an H100 80GB (GB = 1e9 bytes): the launcher refuses a layout whose estimate exceeds it


@dataclass
class MemoryEstimate:
    params: float
    weights_grads_gb: float
    optimizer_gb: float
    activations_gb: float
    logits_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_grads_gb + self.optimizer_gb + self.activations_gb + self.logits_gb

    def describe(self) -> str:
        return (f"~{self.total_gb:.0f} GB/GPU = weights+grads {self.weights_grads_gb:.1f} + Adam "
                f"{self.optimizer_gb:.1f} + activations {self.activations_gb:.1f} + logits "
                f"{self.logits_gb:.1f} (params {self.params / 1e9:.2f}B)")


def memory_estimate(arch: Arch, tp: int, pp: int, dp: int, tokens_per_mb: int) -> MemoryEstimate:
    """Peak trainer memory per GPU (GB = 1e9 bytes), the formula the GPU recipes quote.

    * weights + grads: 2 B (bf16 weight) + 4 B (fp32 main grad) per parameter of this rank's shard
      P / (tp * pp);
    * Adam with the distributed optimizer: 12 B (fp32 master weight, m, v) per parameter, sharded over dp;
    * activations kept for backward, per token per layer, bf16, divided by tp (TP + sequence parallel):
      attention 2*(h LN-in + h LN-out + (h + 2*kv*d) qkv + h core) and MLP 2*(h + h + 2f fc1 + f act),
      i.e. 12h + 4*kv*d + 6f bytes; times tokens_per_mb, times layers per stage, times pp micro-batches
      in flight on the first stage (1F1B);
    * logits: fp32 logits and their gradient on the last stage, vocab split over tp: 8 * tokens * V / tp.
    """
    p = num_params(arch)
    shard = p / (tp * pp)
    h, f, kvd = arch.hidden_size, arch.intermediate_size, arch.num_kv_heads * arch.head_dim
    per_tok_layer = (12 * h + 4 * kvd + 6 * f) / tp
    act = per_tok_layer * tokens_per_mb * (arch.num_layers / pp) * pp
    logits = 8 * tokens_per_mb * arch.vocab_size / tp
    return MemoryEstimate(p, 6 * shard / 1e9, 12 * shard / dp / 1e9, act / 1e9, logits / 1e9)
