"""Packing variable-length samples into micro-batches, and a step's batch into minibatches.

A micro-batch is a padded [b, S] block (S = its longest sample) whose padded size b * S stays under
``max_tokens_per_mb``. Samples are sorted by length so that each block holds similar lengths (little
padding), then the blocks are balanced: the number of blocks is the smallest that fits the budget, and
samples are dealt to blocks so their padded sizes are as even as possible (largest first, into the
block whose padded size grows least). Every sample lands in exactly one block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MicroBatchPlan:
    indices: list[int]  # sample indices of the batch, in block order
    seq_len: int  # padded length S

    @property
    def padded_tokens(self) -> int:
        return len(self.indices) * self.seq_len


def _first_fit_sorted(lengths: list[int], order: list[int], budget: int) -> list[list[int]]:
    bins: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        L = lengths[i]
        new_max = max(cur_max, L)
        if cur and (len(cur) + 1) * new_max > budget:
            bins.append(cur)
            cur, new_max = [], L
        cur.append(i)
        cur_max = new_max
    if cur:
        bins.append(cur)
    return bins


def pack_microbatches(lengths: list[int], max_tokens_per_mb: int, *, min_microbatches: int = 1) -> list[MicroBatchPlan]:
    """Split samples of the given lengths into padded micro-batches under the token budget."""
    if not lengths:
        return []
    too_long = [(i, L) for i, L in enumerate(lengths) if L > max_tokens_per_mb]
    if too_long:
        i, L = too_long[0]
        raise ValueError(f"sample {i} has {L} tokens > trainer.max_tokens_per_mb={max_tokens_per_mb}; "
                         "raise max_tokens_per_mb or lower rollout.max_new_tokens")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    # Lower bound on the block count from the budget; first-fit over sorted lengths gives a feasible count.
    n_bins = max(min_microbatches, len(_first_fit_sorted(lengths, order, max_tokens_per_mb)))
    n_bins = min(n_bins, len(lengths))
    while True:
        bins: list[list[int]] = [[] for _ in range(n_bins)]
        maxes = [0] * n_bins
        ok = True
        for i in order:  # longest first
            L = lengths[i]
            best, best_cost = -1, math.inf
            for b in range(n_bins):
                m = max(maxes[b], L)
                size = (len(bins[b]) + 1) * m
                if size > max_tokens_per_mb:
                    continue
                cost = size - len(bins[b]) * maxes[b]  # growth of this block's padded size
                # prefer the block that stays smallest overall, so blocks come out even
                key = (size, cost)
                if best < 0 or key < best_cost:
                    best, best_cost = b, key
            if best < 0:
                ok = False
                break
            bins[best].append(i)
            maxes[best] = max(maxes[best], L)
        if ok:
            break
        n_bins += 1
    plans = [MicroBatchPlan(sorted(b, key=lambda i: -lengths[i]), maxes[k]) for k, b in enumerate(bins) if b]
    return plans


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
