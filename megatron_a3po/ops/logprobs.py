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
ONE stacked all-reduce SUM of shape [3, chunk]. Only the input reference and per-token vectors (labels and
fp32 lse, H) are saved; backward recomputes p per chunk and needs no collective (the output layer's own
backward reduces the hidden-state gradient across TP). Peak extra memory is the gradient buffer (input
dtype) plus two fp32 workspaces, 8 bytes x chunk_size x V/TP, reused by every chunk.

Cost: two exp per logit (forward, and the recompute in backward) against one for a kernel that keeps the
softmax; that is the price of not storing it. Chunk size (``default_chunk_size``): on CPU, rows such that
a workspace is about 1 MiB (it stays in L2 across the passes; a 151936-column row is one chunk); on GPU,
about 512 MiB (fewer kernel launches and collectives).
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


def _shifted_chunk(x_chunk: torch.Tensor, shift: torch.Tensor, inv_t: float, out: torch.Tensor) -> torch.Tensor:
    """fp32 ``x / T - shift`` (shift per row) written into the workspace ``out``; the input is never touched."""
    if x_chunk.dtype == torch.float32:
        if inv_t != 1.0:
            torch.mul(x_chunk, inv_t, out=out)
            return out.sub_(shift.unsqueeze(-1))
        return torch.sub(x_chunk, shift.unsqueeze(-1), out=out)
    out.copy_(x_chunk)
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out.sub_(shift.unsqueeze(-1))


def _targets(labels1d, vocab_start, n_valid):
    """Local column of each label on this rank (0 where not owned) and the ownership mask."""
    local_t = labels1d - vocab_start
    owned = (local_t >= 0) & (local_t < n_valid)
    return torch.where(owned, local_t, torch.zeros_like(local_t)), owned


def default_chunk_size(device: torch.device, n_cols: int) -> int:
    """Tokens per chunk so that one fp32 workspace is ~1 MiB on CPU (cache-resident) or ~512 MiB on GPU."""
    target = (512 << 20) if device.type == "cuda" else (1 << 20)
    return max(1, target // (4 * max(1, n_cols)))


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    # Two fp32 workspaces of [chunk_size, n_valid] are allocated once per call and reused by every chunk
    # (fresh large allocations per chunk cost page faults on CPU).

    @staticmethod
    def forward(ctx, logits2d, labels1d, tp_group, temperature, vocab_start, n_valid, chunk_size):
        n_tok = logits2d.shape[0]
        dev = logits2d.device
        inv_t = 1.0 / temperature
        logp = torch.empty(n_tok, dtype=torch.float32, device=dev)
        ent = torch.empty(n_tok, dtype=torch.float32, device=dev)
        lse = torch.empty(n_tok, dtype=torch.float32, device=dev)
        local_t, owned = _targets(labels1d, vocab_start, n_valid)
        rows = min(chunk_size, n_tok)
        ws_u = torch.empty(rows, n_valid, dtype=torch.float32, device=dev)
        ws_e = torch.empty(rows, n_valid, dtype=torch.float32, device=dev)
        for s in range(0, n_tok, chunk_size):
            e_ = min(s + chunk_size, n_tok)
            c = e_ - s
            x = logits2d[s:e_, :n_valid]
            if n_valid > 0:   # max(x / T) = max(x) / T for T > 0
                m = x.amax(dim=-1).to(torch.float32).mul_(inv_t)
            else:  # this rank holds only padding columns
                m = torch.full((c,), -math.inf, dtype=torch.float32, device=dev)
            if tp_group is not None:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
            stacked = torch.zeros(3, c, dtype=torch.float32, device=dev)
            if n_valid > 0:
                u = _shifted_chunk(x, m, inv_t, ws_u[:c])                   # u = z - m
                ex = torch.exp(u, out=ws_e[:c])
                stacked[0] = ex.sum(dim=-1)                                 # S = sum exp(u)
                if dev.type == "cpu":   # sum exp(u) * u: BLAS dot per row (no product written;
                    for r in range(c):    # batched bmm/einsum/vecdot are 2-7x slower on CPU)
                        stacked[1, r] = torch.dot(ex[r], u[r])
                else:   # one batched kernel on an accelerator: a Python loop would launch c kernels
                    stacked[1] = torch.linalg.vecdot(ex, u)
                ut = u.gather(-1, local_t[s:e_].unsqueeze(-1)).squeeze(-1)
                stacked[2] = torch.where(owned[s:e_], ut, torch.zeros_like(ut))   # u at the target
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
        n_tok, v_local = logits2d.shape
        dev = logits2d.device
        grad = torch.empty(n_tok, v_local, dtype=logits2d.dtype, device=dev)
        grad[:, n_valid:].zero_()                   # padded columns
        if n_valid == 0:
            return grad, None, None, None, None, None, None
        inv_t = 1.0 / temperature
        # grad_x = (p * (a + b * log p)) + g_logp / T at the target, with log p = z - lse,
        #   a = -(g_logp + g_H * H) / T,  b = -g_H / T     (= -p/T * (g_logp + g_H * (z - (lse - H))))
        g_logp = g_logp.to(torch.float32)
        g_ent = g_ent.to(torch.float32)
        a = (g_logp + g_ent * ent).mul_(-inv_t).unsqueeze(-1)
        b = g_ent.mul(-inv_t).unsqueeze(-1)
        use_ent = bool((g_ent != 0).any())          # entropy often only logged: skip its term then
        local_t, owned = _targets(labels1d, vocab_start, n_valid)
        g_t = torch.where(owned, g_logp * inv_t, torch.zeros_like(g_logp)).unsqueeze(-1)
        local_t = local_t.unsqueeze(-1)
        direct = logits2d.dtype == torch.float32 and n_valid == v_local   # write straight into grad
        rows = min(chunk_size, n_tok)
        ws_q = torch.empty(rows, n_valid, dtype=torch.float32, device=dev)
        ws_p = None if direct else torch.empty(rows, n_valid, dtype=torch.float32, device=dev)
        for s in range(0, n_tok, chunk_size):
            e_ = min(s + chunk_size, n_tok)
            c = e_ - s
            q = _shifted_chunk(logits2d[s:e_, :n_valid], lse[s:e_], inv_t, ws_q[:c])    # log p
            gz = grad[s:e_] if direct else ws_p[:c]
            if use_ent:
                torch.exp(q, out=gz)                                      # p
                gz.mul_(q.mul_(b[s:e_]).add_(a[s:e_]))                    # p * (a + b log p)
            else:
                torch.mul(q.exp_(), a[s:e_], out=gz)                      # p * a
            gz.scatter_add_(-1, local_t[s:e_], g_t[s:e_])
            if not direct:
                grad[s:e_, :n_valid] = gz
        return grad, None, None, None, None, None, None


def vocab_parallel_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, *, tp_group=None,
                                    temperature: float = 1.0, vocab_size: int | None = None,
                                    chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and the entropy of softmax(logits / T), from this rank's vocab shard.

    Args:
        logits: ``[..., V/TP]`` logits of this TP rank (ids ``[k*Vp/TP, (k+1)*Vp/TP)``), any float dtype.
            Never modified. Gradient returned in the same dtype.
        labels: ``[...]`` global token ids in ``[0, vocab_size)``; masked positions must hold a valid id (e.g. 0).
        tp_group: the tensor-parallel process group, or ``None`` for no tensor parallelism.
        temperature: T > 0; log-probs are those of softmax(logits / T), as sampled by the rollout engine.
        vocab_size: real vocabulary size; padded columns (ids >= vocab_size) are excluded from the
            normaliser. Defaults to the padded size ``V/TP * TP`` (no padding).
        chunk_size: tokens per chunk; bounds the fp32 temporaries to about 8 B x chunk_size x V/TP.
            Default: ``default_chunk_size`` (about 1 MiB per workspace on CPU, 512 MiB on GPU).

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
    if chunk_size is None:
        chunk_size = default_chunk_size(logits.device, logits.shape[-1])
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
