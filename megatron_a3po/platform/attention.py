"""``SDPACoreAttention``: megatron's core attention computed with torch's scaled_dot_product_attention.

Used in the local layer spec on CPU (and wherever TransformerEngine is absent). megatron's own
``DotProductAttention`` allocates its score buffer through ``get_global_memory_buffer()`` on CUDA and
forks the CUDA RNG tracker for dropout, so it cannot run on a CPU.

Shapes (megatron's): query [sq, b, heads/TP, d], key/value [sk, b, groups/TP, d] -> [sq, b, heads/TP * d].
Query heads are grouped per KV group (head h uses group h // (heads/groups)), so K/V are expanded with
``repeat_interleave``. Causal masking when the mask type is causal and no explicit mask is given;
an explicit boolean mask follows megatron's convention (True = masked out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPACoreAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention: packed sequences (THD) need TransformerEngine")
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: attention_bias is not supported")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        heads = query.shape[2]
        groups = key.shape[2]
        q = query.permute(1, 2, 0, 3)  # [b, h, sq, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if groups != heads:
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        mask = None if attention_mask is None else ~attention_mask.bool()  # SDPA: True = attend
        p = self.attention_dropout.p if self.training else 0.0
        if q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and mask is None and p == 0.0:
            # the flash kernel, which SDPA picks on an H100 for this case, named so that the simulated
            # cluster (megatron_a3po.platform.sim, where SDPA's kernel choice sees no GPU and would take
            # the math path with its S x S scores) runs and measures the same kernel
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                                     scale=self.softmax_scale)[0]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                 scale=self.softmax_scale)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * query.shape[3])
