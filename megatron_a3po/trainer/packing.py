"""Packing variable-length samples into micro-batches, and a step's batch into minibatches.

A micro-batch is a padded [b, S] block (S = its longest sample, rounded up to ``pad_multiple``: the
tensor-parallel size under sequence parallelism, which splits S over the TP ranks) whose padded size
b * S stays under ``max_tokens_per_mb``. Samples are sorted by length, longest first, and cut into
consecutive runs (``pack_microbatches``): a block holds neighbouring lengths, so padding is small.
Every sample lands in exactly one block. With data parallelism the whole minibatch is packed at once
and the blocks are dealt to the ranks (``plan_minibatch``): more samples to choose neighbours from than
one rank's share has. bench/packing.py measures it against the packers before it (docs/benchmarks.md).
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


def _deal(plans: list[MicroBatchPlan], dp: int, fixed: float) -> tuple[list[list[MicroBatchPlan]], float]:
    """Micro-batches to ``dp`` ranks, largest first, each to the rank with the least work so far (padded
    tokens + ``fixed`` per micro-batch; ties: fewer micro-batches, then the lower rank). Returns the
    ranks' micro-batches and the largest rank's work."""
    load = [0.0] * dp
    out: list[list[MicroBatchPlan]] = [[] for _ in range(dp)]
    for p in sorted(plans, key=lambda p: (-p.padded_tokens, p.indices[0])):
        r = min(range(dp), key=lambda r: (load[r], len(out[r]), r))
        out[r].append(p)
        load[r] += p.padded_tokens + fixed
    return out, max(load)


def _at_least(plans: list[MicroBatchPlan], n: int, pad_multiple: int, lengths: list[int]) -> list[MicroBatchPlan]:
    """Split the micro-batch with the most rows in two (its longer and its shorter half) until there are
    ``n``: every data-parallel rank needs one (it joins the gradient reduction)."""
    plans = list(plans)
    while len(plans) < n:
        k = max(range(len(plans)), key=lambda k: (len(plans[k].indices), -k))
        ix = plans[k].indices
        half = len(ix) // 2
        parts = [ix[:half], ix[half:]]
        plans[k:k + 1] = [MicroBatchPlan(q, _round_up(max(lengths[i] for i in q), pad_multiple)) for q in parts]
    return plans


def plan_minibatch(lengths: list[int], dp: int, max_tokens_per_mb: int, *, pad_multiple: int = 1,
                   overhead: float = MB_OVERHEAD) -> list[list[MicroBatchPlan]]:
    """Pack one minibatch's samples into micro-batches and deal them to ``dp`` data-parallel ranks:
    ``plan[r]``, rank r's micro-batches (indices into ``lengths``).

    The whole minibatch is packed at once (``pack_microbatches``), so a micro-batch holds neighbouring
    lengths of all its samples, not of one rank's share: little padding. The micro-batches are dealt to
    the ranks by padded tokens (``_deal``). Packed under the full token budget, a few large micro-batches
    deal unevenly; under half or a quarter of it, more and smaller ones deal evenly at a higher fixed cost.
    The plan whose busiest rank has the least work (padded tokens + ``overhead * max_tokens_per_mb`` per
    micro-batch: the step waits for it) is kept. Every rank gets at least one micro-batch, every sample
    lands in exactly one; a prompt group may be split over ranks (trainer/reference.py sums the
    per-group terms over the data-parallel group). Deterministic: every caller computes the same plan."""
    if dp < 1:
        raise ValueError(f"data-parallel size must be >= 1, got {dp}")
    if len(lengths) < dp:
        raise ValueError(f"a minibatch of {len(lengths)} samples cannot give each of the {dp} data-parallel "
                         "ranks one: raise rollout.batch_prompts or lower trainer.ppo_n_minibatches")
    fixed = overhead * max_tokens_per_mb
    longest = _round_up(max(lengths), pad_multiple)
    best = None
    budget = max_tokens_per_mb
    while True:
        packed = pack_microbatches(lengths, budget, pad_multiple=pad_multiple,
                                   overhead=overhead * max_tokens_per_mb / budget)  # the same fixed cost
        plans = _at_least(packed, dp, pad_multiple, lengths)
        dealt, work = _deal(plans, dp, fixed)
        if best is None or work < best[1]:
            best = (dealt, work)
        budget //= 2
        if budget < longest or budget < max_tokens_per_mb // 8:
            return best[0]


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
