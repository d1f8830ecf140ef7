"""Megatron models from HF configs (see builder.py) and tiny local test models (tiny.py)."""

from megatron_a3po.models.builder import (Arch, UnsupportedModel, arch_from_hf, build_model, check_layout,
                                          family_of, padded_vocab_size, supported_architectures,
                                          weights_dtype)

__all__ = ["build_model", "arch_from_hf", "family_of", "padded_vocab_size", "check_layout", "Arch",
           "UnsupportedModel", "supported_architectures", "weights_dtype"]
