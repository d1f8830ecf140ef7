"""Loss aggregation: how per-token losses become one minibatch loss, and per-sequence reductions.

Every mode is a per-token coefficient ``c_i`` (a constant: no gradient) with ``loss = sum_i c_i * l_i``
over the masked tokens of the WHOLE minibatch (all micro-batches, all data-parallel ranks). ``N`` is
the global masked-token count, ``N_seq`` the global number of sequences holding at least one masked
token, ``T_s`` the masked-token count of sequence s (all its tokens are in one micro-batch row):

    token-mean                 c_i = 1 / N                          (the default; what the code did before)
    seq-mean-token-mean        c_i = 1 / (N_seq * T_s(i))           (each sequence weighs the same)
    seq-mean-token-sum         c_i = 1 / N_seq                      (each token of a sequence counts fully)
    seq-mean-token-sum-norm    c_i = 1 / (N_seq * C)                (Dr. GRPO: a constant C replaces T_s)

``N``, ``N_seq`` and ``T_s`` are counted on the loss mask before any rollout-correction masking, as the
token mean's N always was (docs/algorithm.md, "Loss aggregation"). Since every micro-batch divides by
the same global counts and a sequence never spans two micro-batches, the summed micro-batch losses and
their gradient do not depend on the micro-batch split nor on the data-parallel size.

Sequences are identified per position by ``seq_ids`` (an integer tensor shaped like the mask): by
default each row of a ``[b, S]`` micro-batch is one sequence (what ``trainer.batch.collate`` builds).
"""

from __future__ import annotations

import torch

__all__ = ["AGG_MODES", "default_seq_ids", "seq_sum", "seq_token_count", "count_sequences", "token_scale"]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def default_seq_ids(mask: torch.Tensor) -> torch.Tensor:
    """One sequence per row of a ``[b, S]`` mask (a 1-D mask is one sequence)."""
    if mask.dim() < 2:
        return torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    rows = torch.arange(mask.shape[0], device=mask.device).view(-1, *([1] * (mask.dim() - 1)))
    return rows.expand(mask.shape)


def _check_ids(seq_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(seq_ids, torch.Tensor) or seq_ids.shape != mask.shape:
        got = tuple(seq_ids.shape) if isinstance(seq_ids, torch.Tensor) else type(seq_ids).__name__
        raise ValueError(f"seq_ids shape {got} must equal the loss mask shape {tuple(mask.shape)}")
    if seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
        raise ValueError("seq_ids must be an integer tensor")
    return seq_ids.to(torch.long)


def seq_sum(x: torch.Tensor, mask: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Per position: the sum of ``x`` over the masked positions of its sequence (0 off the mask).
    ``x`` is treated as a constant (detached)."""
    ids = _check_ids(seq_ids, mask)
    m = mask.bool()
    if not bool(m.any()):
        return torch.zeros_like(x)
    sel = ids[m]
    k = int(sel.max()) + 1
    if int(sel.min()) < 0:
        raise ValueError("seq_ids must be >= 0 at masked positions")
    sums = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, sel, x.detach()[m])
    return torch.where(m, sums[ids.clamp(0, k - 1)], torch.zeros_like(x))


def seq_token_count(mask: torch.Tensor, seq_ids: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Per position: the masked-token count T_s of its sequence (0 off the mask)."""
    return seq_sum(mask.to(dtype), mask, seq_ids)


def count_sequences(mask: torch.Tensor, seq_ids: torch.Tensor | None = None) -> int:
    """The number of sequences with at least one masked token."""
    ids = default_seq_ids(mask) if seq_ids is None else _check_ids(seq_ids, mask)
    sel = ids[mask.bool()]
    return int(torch.unique(sel).numel()) if sel.numel() else 0


def token_scale(mask: torch.Tensor, seq_ids: torch.Tensor, mode: str, *, num_seqs,
                norm_constant: float | None = None, dtype=torch.float32) -> torch.Tensor | None:
    """The per-token coefficient ``c_i`` of aggregation ``mode`` (0 off the mask), or ``None`` for
    token-mean, whose callers divide the token sum by ``num_tokens`` as before (bit for bit)."""
    if mode not in AGG_MODES:
        raise ValueError(f"loss.agg_mode: unknown aggregation {mode!r}; expected one of {AGG_MODES}")
    if mode == "token-mean":
        return None
    m = mask.bool()
    n_seq = float(max(1, int(num_seqs)))
    zero = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    if mode == "seq-mean-token-mean":
        t = seq_token_count(mask, seq_ids, dtype).clamp(min=1)
        return torch.where(m, 1.0 / (n_seq * t), zero)
    if mode == "seq-mean-token-sum":
        return torch.where(m, zero + 1.0 / n_seq, zero)
    if norm_constant is None or not norm_constant > 0:
        raise ValueError(f"loss.agg_norm_constant must be > 0 for agg_mode={mode}, got {norm_constant!r}")
    return torch.where(m, zero + 1.0 / (n_seq * float(norm_constant)), zero)
