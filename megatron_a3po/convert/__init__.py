"""Checkpoint conversion between HF and Megatron at any TP/PP, and streaming HF export (see core.py)."""

from megatron_a3po.convert.core import (CheckpointError, ExportStats, HFReader, export_hf_weights, load_hf_into_model,
                                        load_mcore_checkpoint, save_hf_checkpoint, save_mcore_checkpoint)

__all__ = ["load_hf_into_model", "export_hf_weights", "save_hf_checkpoint", "save_mcore_checkpoint",
           "load_mcore_checkpoint", "ExportStats", "CheckpointError", "HFReader"]
