"""Tiny random HF models and a local character tokenizer, built on this machine (no downloads).

Used by the CPU demo recipe and by the tests (converters, rollout engine, trainer). Every family the
project supports has a tiny configuration here with the features that make a wrong mapping show:
Qwen2 (qkv bias, tied embeddings), Llama 3 (GQA 4:1, untied, llama3 rope scaling), Qwen3 (q/k norm).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen2", "llama", "qwen3")


def tiny_hf_config(family: str = "qwen2", **overrides):
    """A small HF config of ``family``; keyword overrides replace fields."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=97,  # odd on purpose: not divisible by TP, so vocab padding is exercised
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "qwen2":
        kw = dict(common, tie_word_embeddings=True, rope_theta=1000000.0)
        kw.update(overrides)
        return Qwen2Config(**kw)
    if family == "llama":
        kw = dict(
            common,
            num_attention_heads=8,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            attention_bias=False,
            mlp_bias=False,
        )
        kw.update(overrides)
        return LlamaConfig(**kw)
    if family == "qwen3":
        kw = dict(common, head_dim=16, tie_word_embeddings=False, rope_theta=1000000.0, attention_bias=False)
        kw.update(overrides)
        return Qwen3Config(**kw)
    raise ValueError(f"unknown tiny model family {family!r}; supported: {', '.join(FAMILIES)}")


def build_tiny_hf_model(config, *, seed: int = 0, randomize_norms: bool = True, dtype=torch.float32):
    """An HF causal LM from ``config`` with random weights; norms and biases randomised too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if randomize_norms:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
                elif name.endswith(".bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    model.eval()
    return model


def save_tiny_hf_model(out_dir, family: str = "qwen2", *, seed: int = 0, randomize_norms: bool = True,
                       dtype=torch.float32, tokenizer=None, max_shard_size=None, **overrides) -> Path:
    """Build and save a tiny random HF model (safetensors) to ``out_dir``; returns the path."""
    out = Path(out_dir)
    model = build_tiny_hf_model(tiny_hf_config(family, **overrides), seed=seed,
                                randomize_norms=randomize_norms, dtype=dtype)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# A character-level tokenizer (one token per character) with a chat template, built locally.

SPECIAL = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(chars: str):
    """A PreTrainedTokenizerFast with ids 0..4 = SPECIAL and one id per character of ``chars``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    uniq = list(dict.fromkeys(chars))
    vocab = {t: i for i, t in enumerate(SPECIAL + uniq)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>",
        additional_special_tokens=SPECIAL[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
