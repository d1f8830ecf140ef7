"""Packing variable-length samples into micro-batches, and a step's batch into minibatches.

A micro-batch is a padded [b, S] block (S = its longest sample, rounded up to ``pad_multiple``: the
tensor-parallel size under sequence parallelism, which splits S over the TP ranks) whose padded size
b * S stays under ``max_tokens_per_mb``. Samples are sorted by length, longest first, and cut into
consecutive runs (``pack_microbatches``): a block holds neighbouring lengths, so padding is small.
Every sample lands in exactly one block. (The packer before this one dealt the longest samples round-robin over the
blocks to even them out, mixing long and short rows: on GSM8K lengths it padded 0.69 real tokens per
padded token; bench/packing.py compares the two.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MicroBatchPlan:
    indices: list[int]  # sample indices of the batch, in block order
    seq_len: int  # padded length S

    @property
    def padded_tokens(self) -> int:
        return len(self.indices) * self.seq_len


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


MB_OVERHEAD = 0.05  # a micro-batch's fixed cost (launches, pipeline hand-offs), as a share of a full one


def pack_microbatches(lengths: list[int], max_tokens_per_mb: int, *, pad_multiple: int = 1,
                      overhead: float = MB_OVERHEAD) -> list[MicroBatchPlan]:
    """Split samples of the given lengths into padded micro-batches under the token budget.

    Sorted by length, the samples are cut into consecutive runs minimising the padded tokens plus
    ``overhead * max_tokens_per_mb`` per micro-batch (dynamic programming over the cut points): a run
    holds neighbouring lengths, so padding is small, and a micro-batch is added only where it saves
    more padding than its fixed cost."""
    if not lengths:
        return []
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    too_long = [(i, L) for i, L in enumerate(lengths) if _round_up(L, pad_multiple) > max_tokens_per_mb]
    if too_long:
        i, L = too_long[0]
        raise ValueError(f"sample {i} has {L} tokens > trainer.max_tokens_per_mb={max_tokens_per_mb}"
                         + (f" (padded to a multiple of {pad_multiple})" if pad_multiple > 1 else "")
                         + "; raise max_tokens_per_mb or lower rollout.max_new_tokens")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    S = [_round_up(lengths[i], pad_multiple) for i in order]  # non-increasing
    n, fixed = len(order), overhead * max_tokens_per_mb
    best = [0.0] + [float("inf")] * n  # best[j]: cost of packing the j longest samples
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # run order[i:j], padded to S[i] (its longest)
            if (j - i) * S[i] > max_tokens_per_mb:
                break
            c = best[i] + (j - i) * S[i] + fixed
            if c < best[j]:
                best[j], cut[j] = c, i
    plans: list[MicroBatchPlan] = []
    j = n
    while j > 0:
        i = cut[j]
        plans.append(MicroBatchPlan(order[i:j], S[i]))
        j = i
    return plans[::-1]


def split_minibatches(n_samples: int, n_minibatches: int, group_size: int = 1) -> list[list[int]]:
    """Contiguous, equal-as-possible minibatches of sample indices; whole groups stay together."""
    if n_minibatches < 1:
        raise ValueError(f"trainer.ppo_n_minibatches must be >= 1, got {n_minibatches}")
    n_groups = n_samples // group_size
    if n_groups * group_size != n_samples:
        raise ValueError(f"{n_samples} samples is not a whole number of groups of {group_size}")
    if n_minibatches > n_groups:
        raise ValueError(f"trainer.ppo_n_minibatches={n_minibatches} > number of prompt groups {n_groups}")
    out = []
    for k in range(n_minibatches):
        g0 = k * n_groups // n_minibatches
        g1 = (k + 1) * n_groups // n_minibatches
        out.append(list(range(g0 * group_size, g1 * group_size)))
    return out


def dp_shares(costs: list[int], dp: int) -> list[list[int]]:
    """Deal items (prompt groups) to ``dp`` data-parallel ranks so their token counts are even.

    Largest first, each to the rank with the fewest tokens so far (ties: the lower rank); each rank's
    indices come back in batch order. Every item lands on exactly one rank; no rank is left empty
    while there are at least ``dp`` items. Deterministic: every caller computes the same split."""
    if dp < 1:
        raise ValueError(f"data-parallel size must be >= 1, got {dp}")
    load = [0] * dp
    out: list[list[int]] = [[] for _ in range(dp)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(dp), key=lambda r: (load[r], len(out[r]), r))
        out[r].append(i)
        load[r] += costs[i]
    return [sorted(s) for s in out]


def plan_data_parallel(group_tokens: list[int], n_minibatches: int, dp: int) -> list[list[list[int]]]:
    """``plan[k][r]``: the prompt groups (indices into the batch) that DP rank ``r`` trains on in
    minibatch ``k``. Minibatches are contiguous runs of whole groups (as ``split_minibatches``);
    inside each, the groups are dealt to the DP ranks by tokens (``dp_shares``)."""
    mbs = split_minibatches(len(group_tokens), n_minibatches, 1)
    plan = []
    for k, idx in enumerate(mbs):
        if len(idx) < dp:
            raise ValueError(f"minibatch {k} has {len(idx)} prompt groups, fewer than the {dp} data-parallel "
                             "ranks: raise rollout.batch_size or lower trainer.ppo_n_minibatches")
        shares = dp_shares([group_tokens[g] for g in idx], dp)
        plan.append([[idx[j] for j in s] for s in shares])
    return plan
