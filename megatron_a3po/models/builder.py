"""A Megatron GPTModel from an HF config, for this rank under the current parallel state.

Supported families (``family_of``; one file each in megatron_a3po/models/families): Qwen2/Qwen2.5 (qkv
bias, tied embeddings in the small models), Llama 3/3.1 (GQA, rope scaling "llama3"), Qwen3 (q/k RMSNorm
per head). HF configs are read through ``arch_from_hf`` only, which handles transformers 4.x and 5.x
field names.

Rotary frequencies: megatron's built-in rope scaling hard-codes the Llama-3.1 constants, so instead the
model's ``inv_freq`` is set from transformers' own rope initialisers for the config's rope type
(default, llama3, linear, dynamic at its base length); types that also rescale attention (yarn,
longrope) are refused rather than silently mis-computed.

Layer spec: TransformerEngine's when it is importable and CUDA exists, else megatron's local spec with
``SDPACoreAttention`` (megatron_a3po.platform.attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_a3po.models.layout import check_layout
from megatron_a3po.platform import device, is_cpu
from megatron_a3po.errors import A3POError

VOCAB_DIVISIBLE_BY = 128


class UnsupportedModel(A3POError, ValueError):
    pass


@dataclass(frozen=True)
class Arch:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    source: str = ""  # where it was read from (a config.json, model.tiny, ...): error messages name it


def supported_architectures() -> dict[str, str]:
    """HF architecture name -> family name, for every family in megatron_a3po.models.families."""
    from megatron_a3po.models.families import registry

    return {a: f.name for f in registry().values() for a in f.architectures}


def family_of(hf_config) -> str:
    from megatron_a3po.models.families import registry

    archs = list(getattr(hf_config, "architectures", None) or [])
    supported = supported_architectures()
    for a in archs:
        if a in supported:
            return supported[a]
    mt = getattr(hf_config, "model_type", None)
    if not archs and mt in registry():
        return mt
    name = archs[0] if archs else mt
    raise UnsupportedModel(f"unsupported architecture {name!r}; supported: {', '.join(sorted(supported))}")


def _rope_params(cfg) -> dict:
    """rope settings in one dict across transformers 4.x (rope_theta, rope_scaling) and 5.x (rope_parameters)."""
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and rp:
        return dict(rp)
    out = dict(getattr(cfg, "rope_scaling", None) or {})
    out.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    out.setdefault("rope_type", out.get("type", "default"))
    return out


def arch_from_hf(cfg, source: str = "", *, shape_only: bool = False) -> Arch:
    """The one reading of an HF config (a transformers config object) into an ``Arch``.

    ``shape_only``: a config of no supported family still gives its shapes (family ""), for the
    launcher's layout checks of models it will not build itself."""
    from megatron_a3po.models.families import get_family

    try:
        fam = family_of(cfg)
    except UnsupportedModel:
        if not shape_only:
            raise
        fam, family = "", None
    else:
        family = get_family(fam)
    nh = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    rope = _rope_params(cfg)
    return Arch(
        family=fam, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_layers=cfg.num_hidden_layers, num_heads=nh,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or nh, head_dim=hd,
        rms_eps=getattr(cfg, "rms_norm_eps", 1e-6), rope_theta=float(rope.get("rope_theta", 10000.0)),
        max_position=getattr(cfg, "max_position_embeddings", 0),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=family.has_qkv_bias(cfg) if family else bool(getattr(cfg, "attention_bias", False)),
        qk_norm=family.qk_norm if family else False, source=source,
    )


def arch_of_model_cfg(model_cfg) -> Arch:
    """The ``Arch`` of a recipe's ``model`` section without loading weights: ``model.tiny`` (its vocabulary
    is the task tokenizer's, unknown here: vocab_size 0), else the config.json of ``model.hf_path`` or of
    ``model.mcore_path``/hf_config. A missing file is an ``UnsupportedModel`` naming the key."""
    from pathlib import Path

    if model_cfg.tiny is not None:
        from megatron_a3po.models.tiny import tiny_hf_config

        t = model_cfg.tiny
        cfg = tiny_hf_config("qwen2", vocab_size=0, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                             num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                             num_key_value_heads=t.num_key_value_heads, tie_word_embeddings=t.tie_word_embeddings,
                             max_position_embeddings=t.max_position_embeddings,
                             pad_token_id=None, bos_token_id=None, eos_token_id=None)  # no vocabulary yet
        return arch_from_hf(cfg, source="model.tiny")
    if model_cfg.hf_path is not None:
        f = Path(model_cfg.hf_path) / "config.json"
        if not f.exists():
            raise UnsupportedModel(f"model.hf_path={model_cfg.hf_path}: {f} not found")
    else:
        root = Path(model_cfg.mcore_path)
        if not root.exists():
            raise UnsupportedModel(f"model.mcore_path={model_cfg.mcore_path}: directory not found")
        f = root / "hf_config" / "config.json"
        if not f.exists():
            raise UnsupportedModel(f"model.mcore_path={model_cfg.mcore_path}: {f} not found "
                                   "(convert with tools.convert_ckpt)")
    return arch_from_config_json(f)


def arch_from_config_json(path, *, shape_only: bool = False) -> Arch:
    """``arch_from_hf`` of a config.json file (through transformers' own config class for its model_type,
    the generic one without); a missing, unreadable or incomplete file is an ``UnsupportedModel`` naming it."""
    import json
    from pathlib import Path

    from transformers import AutoConfig, PretrainedConfig

    path = Path(path)
    try:
        d = json.loads(path.read_text())
        mt = d.pop("model_type", None)
        cfg = AutoConfig.for_model(mt, **d) if mt else PretrainedConfig(**d)
    except (OSError, ValueError, TypeError) as e:
        raise UnsupportedModel(f"{path}: cannot read the model config ({type(e).__name__}: {e})") from None
    try:
        return arch_from_hf(cfg, source=str(path), shape_only=shape_only)
    except AttributeError as e:
        raise UnsupportedModel(f"{path}: model config lacks {getattr(e, 'name', None) or e}") from None


def weights_dtype(hf_config) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (config ``dtype``/``torch_dtype``; float32 if unset)."""
    d = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    if isinstance(d, str):
        d = getattr(torch, d.replace("torch.", ""), None)
    if d not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnsupportedModel(f"config dtype {d!r}: expected float32, bfloat16 or float16")
    return d


def padded_vocab_size(vocab: int, tp: int) -> int:
    m = VOCAB_DIVISIBLE_BY * tp
    return ((vocab + m - 1) // m) * m


def _use_te() -> bool:
    if is_cpu():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - an installed but broken Transformer Engine: not available
        return False
    return True


def layer_spec(arch: Arch):
    if _use_te():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_a3po.platform.attention import SDPACoreAttention
    from megatron_a3po.platform.norm import RMSNorm

    spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm  # SP-capable
    if arch.qk_norm:
        spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
    return spec


def _block_spec(arch: Arch, cfg):
    """The decoder block: the layer spec per layer of this stage, and (local spec) the final norm."""
    if _use_te():
        return layer_spec(arch)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from megatron_a3po.platform.norm import RMSNorm

    return TransformerBlockSubmodules(layer_specs=[layer_spec(arch)] * get_num_layers_to_build(cfg),
                                      layer_norm=RMSNorm)


def transformer_config(arch: Arch, *, params_dtype=torch.float32, sequence_parallel: bool = False,
                       init_weights: bool = True):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    check_layout(arch, tp=tp, pp=pp)
    cpu = is_cpu()
    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, pipeline_dtype=params_dtype,
        use_cpu_initialization=cpu, perform_initialization=init_weights,
        # fused SwiGLU (megatron's own kernel: saves the fc1 output only, 2f bytes per token instead of the
        # unfused GLU's 5f) wherever there is a GPU; fused RoPE needs TransformerEngine. Unfused on CPU.
        bias_activation_fusion=not cpu, apply_rope_fusion=_use_te(),
        bias_dropout_fusion=False, masked_softmax_fusion=False,
        # no device-wide synchronize after every batched pipeline send/receive (megatron's workaround
        # for a race of old NCCL versions): ten per step at PP=2 in the simulated 32B
        batch_p2p_sync=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        # micro-batches differ in [b, S]; PP then exchanges shapes first. megatron-core's validation
        # rejects this with its default MoE dispatcher even for dense models, so name one it accepts.
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
    )


def _hf_inv_freq(hf_config, head_dim: int) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = _rope_params(hf_config)
    rtype = rope.get("rope_type", "default")
    if rtype == "default":
        base = float(rope.get("rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rtype not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedModel(f"rope type {rtype!r} is not known to this transformers version")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rtype](hf_config, torch.device("cpu"))
    if float(scaling) != 1.0:
        raise UnsupportedModel(f"rope type {rtype!r} rescales attention (factor {scaling}); not supported")
    return inv_freq.float()


def build_model(hf_config, *, params_dtype=torch.float32, pre_process=None, post_process=None,
                sequence_parallel: bool = False, init_weights: bool = True):
    """This rank's GPTModel chunk for ``hf_config`` (load weights with megatron_a3po.convert).

    ``init_weights=False`` skips the random initialisation, for callers that load every parameter
    next (converters, the trainer): seconds on a 1B model on CPU, minutes at 70B."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    arch = arch_from_hf(hf_config)
    cfg = transformer_config(arch, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                             init_weights=init_weights)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    # built on this rank's device: megatron puts its parameters there (use_cpu_initialization off), and
    # the default device catches what it makes with plain torch factories (the local spec's RMSNorm)
    with torch.device(device()):
        model = GPTModel(
            config=cfg, transformer_layer_spec=_block_spec(arch, cfg),
            vocab_size=padded_vocab_size(arch.vocab_size, ps.get_tensor_model_parallel_world_size()),
            max_sequence_length=arch.max_position, pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=arch.tie_embeddings, position_embedding_type="rope",
            rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        )
    model.rotary_pos_emb.inv_freq = _hf_inv_freq(hf_config, arch.head_dim).to(
        model.rotary_pos_emb.inv_freq.device)
    model.hf_arch = arch
    if is_cpu():
        model = model.to(params_dtype)
    else:
        elsewhere = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                     if t.device != device()]
        if elsewhere:
            raise RuntimeError(f"build_model: {elsewhere[:3]} not on {device()}")
        with torch.no_grad():  # the local spec's torch RMSNorm is made in the default dtype: as on CPU,
            for p in model.parameters():  # every parameter in params_dtype (TE's norms are too)
                if p.is_floating_point() and p.dtype != params_dtype:
                    p.data = p.data.to(params_dtype)
    return model
