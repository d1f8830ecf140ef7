"""Per-token log-probs and entropy from vocab-sharded logits, in one autograd function.

Math (per token, z = logits / T over the real vocabulary, target id t)::

    lse  = log sum_j exp(z_j)
    logp = z_t - lse
    H    = -sum_j p_j log p_j = lse - sum_j p_j z_j,        p = softmax(z)

Gradients (g_logp, g_H are the incoming gradients of the two outputs)::

    dlogp/dz_j = [j == t] - p_j
    dH/dz_j    = -p_j (z_j - (lse - H))
    grad_z     = -p * (g_logp + g_H * (z - (lse - H)))  +  g_logp at column t
    grad_logits = grad_z / T

Tensor parallelism: TP rank k holds the logit columns of vocab ids [k*Vp/TP, (k+1)*Vp/TP), where Vp is the
padded vocab (Megatron's ColumnParallelLinear output layer). Columns with id >= ``vocab_size`` are padding
and are left out of the softmax. Forward, per token chunk and in fp32: local max -> all-reduce MAX, then
sum(exp(z - m)), sum(exp(z - m) * (z - m)) and the target logit (0 on ranks that do not own it) go through
ONE stacked all-reduce SUM of shape [3, chunk]. Only the input reference and three per-token fp32 vectors
(lse, H, and the labels) are saved; backward recomputes p per chunk and needs no collective (the output
layer's own backward reduces the hidden-state gradient across TP). Peak extra memory is the gradient
buffer (input dtype) plus about 12 bytes x chunk_size x V/TP of fp32 temporaries.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["vocab_parallel_logprobs_entropy"]


def _tp_info(tp_group):
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _scaled_chunk(x_chunk: torch.Tensor, temperature: float, n_valid: int) -> torch.Tensor:
    """fp32 z = x / T over this rank's real-vocab columns; always a NEW tensor (the input is never touched)."""
    return x_chunk[:, :n_valid].to(torch.float32).div(temperature)


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, labels1d, tp_group, temperature, vocab_start, n_valid, chunk_size):
        n_tok = logits2d.shape[0]
        dev = logits2d.device
        logp = torch.empty(n_tok, dtype=torch.float32, device=dev)
        ent = torch.empty(n_tok, dtype=torch.float32, device=dev)
        lse = torch.empty(n_tok, dtype=torch.float32, device=dev)
        local_t = labels1d - vocab_start
        owned = (local_t >= 0) & (local_t < n_valid)
        local_t = torch.where(owned, local_t, torch.zeros_like(local_t))
        for s in range(0, n_tok, chunk_size):
            e_ = min(s + chunk_size, n_tok)
            z = _scaled_chunk(logits2d[s:e_], temperature, n_valid)  # [c, n_valid] fp32
            if n_valid > 0:
                m = z.max(dim=-1).values
            else:  # this rank holds only padding columns
                m = torch.full((e_ - s,), -math.inf, dtype=torch.float32, device=dev)
            if tp_group is not None:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
            u = z.sub_(m.unsqueeze(-1))  # z - m, in place on our own temporary
            ex = torch.exp(u)
            stacked = torch.empty(3, e_ - s, dtype=torch.float32, device=dev)
            stacked[0] = ex.sum(dim=-1)
            stacked[1] = ex.mul_(u).sum(dim=-1)  # sum exp(u) * u
            if n_valid > 0:
                ut = u.gather(-1, local_t[s:e_].unsqueeze(-1)).squeeze(-1)
                stacked[2] = torch.where(owned[s:e_], ut, torch.zeros_like(ut))
            else:
                stacked[2] = 0.0
            del z, u, ex
            if tp_group is not None:
                dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=tp_group)
            sum_e, sum_eu, u_t = stacked[0], stacked[1], stacked[2]
            log_s = torch.log(sum_e)
            logp[s:e_] = u_t - log_s              # z_t - lse, with lse = m + log S
            ent[s:e_] = log_s - sum_eu / sum_e     # lse - E_p[z]
            lse[s:e_] = m + log_s
        ctx.save_for_backward(logits2d, labels1d, lse, ent)
        ctx.cfg = (temperature, vocab_start, n_valid, chunk_size)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits2d, labels1d, lse, ent = ctx.saved_tensors
        temperature, vocab_start, n_valid, chunk_size = ctx.cfg
        n_tok = logits2d.shape[0]
        grad = torch.zeros_like(logits2d, memory_format=torch.contiguous_format)
        if n_valid == 0:
            return grad, None, None, None, None, None, None
        g_logp = g_logp.to(torch.float32)
        g_ent = g_ent.to(torch.float32)
        local_t = labels1d - vocab_start
        owned = (local_t >= 0) & (local_t < n_valid)
        local_t = torch.where(owned, local_t, torch.zeros_like(local_t))
        inv_t = 1.0 / temperature
        for s in range(0, n_tok, chunk_size):
            e_ = min(s + chunk_size, n_tok)
            z = _scaled_chunk(logits2d[s:e_], temperature, n_valid)
            lse_c, shift = lse[s:e_].unsqueeze(-1), (lse[s:e_] - ent[s:e_]).unsqueeze(-1)
            p = torch.exp(z - lse_c)
            gz = z.sub_(shift).mul_(g_ent[s:e_].unsqueeze(-1)).add_(g_logp[s:e_].unsqueeze(-1)).mul_(p).neg_()
            del p
            add_t = torch.where(owned[s:e_], g_logp[s:e_], torch.zeros_like(g_logp[s:e_]))
            gz.scatter_add_(-1, local_t[s:e_].unsqueeze(-1), add_t.unsqueeze(-1))
            grad[s:e_, :n_valid] = gz.mul_(inv_t)
        return grad, None, None, None, None, None, None


def vocab_parallel_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, *, tp_group=None,
                                    temperature: float = 1.0, vocab_size: int | None = None,
                                    chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and the entropy of softmax(logits / T), from this rank's vocab shard.

    Args:
        logits: ``[..., V/TP]`` logits of this TP rank (ids ``[k*Vp/TP, (k+1)*Vp/TP)``), any float dtype.
            Never modified. Gradient returned in the same dtype.
        labels: ``[...]`` global token ids in ``[0, vocab_size)``; masked positions must hold a valid id (e.g. 0).
        tp_group: the tensor-parallel process group, or ``None`` for no tensor parallelism.
        temperature: T > 0; log-probs are those of softmax(logits / T), as sampled by the rollout engine.
        vocab_size: real vocabulary size; padded columns (ids >= vocab_size) are excluded from the
            normaliser. Defaults to the padded size ``V/TP * TP`` (no padding).
        chunk_size: tokens per chunk; bounds the fp32 temporaries to about 12 B x chunk_size x V/TP.

    Returns:
        ``(logprobs, entropy)``, both fp32 with shape ``labels.shape``; both differentiable w.r.t. ``logits``.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError("logits must be a floating-point tensor of shape [..., V/TP]")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError("labels must be an integer tensor")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab dim "
                         f"{tuple(logits.shape[:-1])}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    tp, rank = _tp_info(tp_group)
    v_local = logits.shape[-1]
    v_padded = v_local * tp
    if vocab_size is None:
        vocab_size = v_padded
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= v_padded:
        raise ValueError(f"vocab_size must be an int in [1, {v_padded}] (V/TP * TP), got {vocab_size!r}")
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"labels must lie in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]")
    vocab_start = rank * v_local
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    lead = labels.shape
    logp, ent = _VocabParallelLogprobsEntropy.apply(
        logits.reshape(-1, v_local), labels.reshape(-1).to(logits.device), tp_group, float(temperature),
        vocab_start, n_valid, chunk_size)
    return logp.view(lead), ent.view(lead)
