"""Trainer-side samples and their aligned per-token tensors.

Alignment (docs/algorithm.md, "Alignment"): position i of a sequence scores token i+1. For a sample with a
prompt of P tokens and a response of R tokens, the sequence is ``prompt + response`` and the response
token j (0-based) is scored at position ``P - 1 + j``. Every per-token tensor (labels, behaviour
log-probs, versions, loss mask, advantages) is written at that shifted position, together; prompt and
padding positions carry version -1, mask 0, behaviour log-prob 0 and advantage 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TrainSample:
    prompt_ids: list[int]
    response_ids: list[int]
    behave_logprobs: list[float]  # one per response token
    versions: list[int]  # policy version that generated each response token
    advantage: float
    reward: float = 0.0
    group_id: int = -1
    prompt_index: int = -1

    def __post_init__(self):
        R = len(self.response_ids)
        if len(self.behave_logprobs) != R or len(self.versions) != R:
            raise ValueError(f"sample of group {self.group_id}: {R} response tokens but "
                             f"{len(self.behave_logprobs)} behave_logprobs and {len(self.versions)} versions")
        if not self.prompt_ids:
            raise ValueError(f"sample of group {self.group_id}: empty prompt_ids")

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class Share:
    """One data-parallel rank's part of one minibatch: its samples (in micro-batch order) and the
    micro-batches to pack them into (``plans``: indices into ``samples``). ``positions[i]`` is sample i's
    index in the whole minibatch of ``minibatch_size`` samples: a prompt group may be split over the ranks,
    and trainer/reference.py puts the group back together by it."""
    samples: list
    plans: list  # packing.MicroBatchPlan
    positions: list[int]
    minibatch_size: int


def dp_split(groups: list, lengths: list[list[int]], n_minibatches: int, dp: int, max_tokens_per_mb: int,
             pad_multiple: int = 1) -> list[list[Share]]:
    """``per_dp[r][k]``: the ``Share`` data-parallel rank ``r`` trains on in minibatch ``k``. Minibatches
    are contiguous runs of whole prompt groups (``packing.split_minibatches``); each minibatch's samples
    (``lengths[g][j]``: sample j of group g) are packed and dealt to the ranks by ``packing.plan_minibatch``.
    The one data-parallel split: the trainer deals rank 0's batch with it (trainer/loop.py),
    ``Actor.train_step`` takes its own rank's share."""
    from megatron_a3po.trainer.packing import MicroBatchPlan, plan_minibatch, split_minibatches

    per_dp: list[list[Share]] = [[] for _ in range(dp)]
    for k, gidx in enumerate(split_minibatches(len(groups), n_minibatches, 1)):
        samples = [s for g in gidx for s in groups[g]]
        lens = [L for g in gidx for L in lengths[g]]
        try:
            plan = plan_minibatch(lens, dp, max_tokens_per_mb, pad_multiple=pad_multiple)
        except ValueError as e:
            raise ValueError(f"minibatch {k}: {e}") from None
        for r, mbs in enumerate(plan):
            order = [i for p in mbs for i in p.indices]
            plans, at = [], 0
            for p in mbs:
                plans.append(MicroBatchPlan(list(range(at, at + len(p.indices))), p.seq_len))
                at += len(p.indices)
            per_dp[r].append(Share([samples[i] for i in order], plans, order, len(samples)))
    return per_dp


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, S] int64
    position_ids: torch.Tensor  # [b, S]
    labels: torch.Tensor  # [b, S] next token (0 at the last position / padding)
    loss_mask: torch.Tensor  # [b, S] float32
    behave_logp: torch.Tensor  # [b, S] float32
    versions: torch.Tensor  # [b, S] int64, -1 off the response
    advantages: torch.Tensor  # [b, S] float32
    sample_index: list[int] = field(default_factory=list)  # batch indices of the rows
    prox_logp: torch.Tensor | None = None  # [b, S], filled by the recompute pass
    ref_logp: torch.Tensor | None = None  # [b, S], filled by the reference pass (loss.kl_coef > 0)
    n_tokens: int | None = None  # masked (response) tokens, counted on the host when collated
    n_seqs: int | None = None  # sequences with a masked token (one per row), counted on the host when collated

    @property
    def num_tokens(self) -> int:
        if self.n_tokens is None:  # a micro-batch built by hand: count it (a device sync on a GPU)
            self.n_tokens = int(self.loss_mask.sum().item())
        return self.n_tokens

    @property
    def num_seqs(self) -> int:
        """Sequences with at least one masked token (loss/aggregate.py's count, a device sync on a GPU,
        for a micro-batch built by hand or one whose rows hold several sequences: ``seq_ids``)."""
        if self.n_seqs is None or getattr(self, "seq_ids", None) is not None:
            from megatron_a3po.loss.aggregate import count_sequences

            return count_sequences(self.loss_mask, getattr(self, "seq_ids", None))
        return self.n_seqs


def collate(samples: list[TrainSample], indices: list[int], seq_len: int, pad_id: int = 0,
            device: torch.device | None = None) -> MicroBatch:
    """The padded [b, seq_len] micro-batch of ``samples[indices]``, built on the host and moved to
    ``device`` (the model's: megatron_a3po.platform.device()) in one copy per tensor."""
    b = len(indices)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.zeros((b, seq_len), dtype=torch.long)
    mask = torch.zeros((b, seq_len), dtype=torch.float32)
    blp = torch.zeros((b, seq_len), dtype=torch.float32)
    ver = torch.full((b, seq_len), -1, dtype=torch.long)
    adv = torch.zeros((b, seq_len), dtype=torch.float32)
    for row, i in enumerate(indices):
        s = samples[i]
        seq = s.prompt_ids + s.response_ids
        L, P, R = len(seq), len(s.prompt_ids), len(s.response_ids)
        tokens[row, :L] = torch.tensor(seq)
        labels[row, : L - 1] = torch.tensor(seq[1:])
        if R:
            sl = slice(P - 1, P - 1 + R)
            mask[row, sl] = 1.0
            blp[row, sl] = torch.tensor(s.behave_logprobs, dtype=torch.float32)
            ver[row, sl] = torch.tensor(s.versions, dtype=torch.long)
            adv[row, sl] = float(s.advantage)
    pos = torch.arange(seq_len).unsqueeze(0).expand(b, seq_len).contiguous()
    n = sum(len(samples[i].response_ids) for i in indices)
    ts = [tokens, pos, labels, mask, blp, ver, adv]
    if device is not None and torch.device(device) != tokens.device:
        ts = [t.to(device, non_blocking=True) for t in ts]
    return MicroBatch(*ts, sample_index=list(indices), n_tokens=n,
                      n_seqs=sum(1 for i in indices if samples[i].response_ids))
