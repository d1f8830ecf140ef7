"""Megatron models from HF configs (see builder.py), the one layout validator (layout.py) and tiny local
test models (tiny.py)."""

from megatron_a3po.models.builder import (Arch, UnsupportedModel, arch_from_config_json, arch_from_hf,
                                          arch_of_model_cfg, build_model,
                                          family_of, padded_vocab_size, supported_architectures, weights_dtype)
from megatron_a3po.models.layout import LayoutError, check_layout, layout_errors

__all__ = ["build_model", "arch_from_hf", "arch_from_config_json", "arch_of_model_cfg", "family_of", "padded_vocab_size", "check_layout",
           "layout_errors", "LayoutError", "Arch", "UnsupportedModel", "supported_architectures", "weights_dtype"]
