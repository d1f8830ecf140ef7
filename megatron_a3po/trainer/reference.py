"""The reference policy for the KL term: the actor's initial weights, swapped into the actor for one
forward-only pass per step, and the KL-in-reward advantages.

Placement (recipe ``loss.kl_ref_placement``):

* ``device``: a copy of the initial weights stays beside the trained ones (one more set of parameters
  in accelerator memory); the reference pass points each parameter at its copy and back, so no bytes
  move.
* ``host``: the copy lives in host memory (pinned on a GPU machine) and each reference pass copies it
  in (one host-to-device transfer of the parameters per step) and drops it afterwards: accelerator
  memory holds the reference weights only during that pass. slime keeps its reference this way.

Either way the pass is the recompute baseline's forward pass, paid again: the cost A-3PO saves on the
proximal policy comes back with a reference KL. The trainer logs it as ``time/ref_logp`` beside
``time/prox_logp``; docs/algorithm.md ("KL to a reference policy") quotes measured numbers.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from megatron_a3po.platform import synchronize

__all__ = ["ReferencePolicy", "kl_penalised_advantages", "penalise_advantages"]

PLACEMENTS = ("device", "host")


class ReferencePolicy:
    """The initial weights of ``chunks`` (call at construction, before any update)."""

    def __init__(self, chunks, placement: str = "device"):
        if placement not in PLACEMENTS:
            raise ValueError(f"loss.kl_ref_placement: unknown placement {placement!r}; expected one of {PLACEMENTS}")
        self.placement = placement
        self.params = [p for m in chunks for p in m.parameters()]
        with torch.no_grad():
            if placement == "device":
                self.ref = [p.detach().clone() for p in self.params]
            else:
                pin = any(p.is_cuda for p in self.params)
                self.ref = [p.detach().to("cpu", copy=True) for p in self.params]
                if pin:
                    self.ref = [t.pin_memory() for t in self.ref]
        self.last_swap_s = 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.ref)

    @contextmanager
    def swapped_in(self):
        """Inside: every parameter holds the reference weights (forward passes only)."""
        saved = [p.data for p in self.params]
        synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            for p, r in zip(self.params, self.ref):
                p.data = r if self.placement == "device" else r.to(p.device, non_blocking=True, copy=True)
        synchronize()
        self.last_swap_s = time.perf_counter() - t0
        try:
            yield
        finally:
            for p, s in zip(self.params, saved):
                p.data = s


def kl_penalised_advantages(rewards: list[float], kl_sums: list[float], group_ids: list[int], coef: float,
                            adv_norm: str, adv_eps: float) -> list[float]:
    """GRPO advantages of the rewards minus ``coef`` times each sample's summed KL estimate, normalised
    within each group (samples with the same ``group_id``) as rollout/types.py's group_advantages does."""
    from megatron_a3po.rollout.types import group_advantages

    if not len(rewards) == len(kl_sums) == len(group_ids):
        raise ValueError(f"{len(rewards)} rewards, {len(kl_sums)} KL sums, {len(group_ids)} group ids")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        adv = group_advantages([rewards[i] - coef * kl_sums[i] for i in idx], adv_norm, adv_eps)
        for i, a in zip(idx, adv):
            out[i] = a
    return out


def penalise_advantages(mbs, share, *, coef: float, estimator: str, adv_norm: str, adv_eps: float,
                        group=None) -> float:
    """KL in the reward, on the last pipeline stage: each sample's KL estimate summed over its response
    (behaviour log-probs against ``mb.ref_logp``) is subtracted, times ``coef``, from its reward and the
    group advantages are recomputed into ``mb.advantages``. ``share``: this rank's ``batch.Share`` of the
    minibatch, which the micro-batches' ``sample_index`` points into. A prompt group may be split over the
    data-parallel ranks: every rank writes its samples' (KL sum, reward, group id) at their minibatch
    positions and the rows are summed over ``group`` (the data-parallel group), so each rank normalises
    whole groups. Returns the mean penalty per sample of the minibatch."""
    import torch.distributed as dist

    from megatron_a3po.loss.kl import kl_estimate
    from megatron_a3po.platform import comm_device

    rows = torch.zeros(share.minibatch_size, 3, dtype=torch.float64)  # KL sum, reward, group id
    for mb in mbs:
        mask = mb.loss_mask.bool()
        k = kl_estimate(mb.behave_logp.double(), mb.ref_logp.double(), estimator)
        per_row = torch.where(mask, k, torch.zeros_like(k)).sum(-1).tolist()  # one copy to the host
        for row, i in enumerate(mb.sample_index):
            rows[share.positions[i], 0] = per_row[row]
    for pos, s in zip(share.positions, share.samples):
        rows[pos, 1], rows[pos, 2] = s.reward, s.group_id
    if group is not None and dist.get_world_size(group) > 1:
        t = rows.to(comm_device())
        dist.all_reduce(t, group=group)  # each position is filled on exactly one rank
        rows = t.cpu()
    kl_sums = rows[:, 0].tolist()
    adv = kl_penalised_advantages(rows[:, 1].tolist(), kl_sums, [int(g) for g in rows[:, 2].tolist()], coef,
                                  adv_norm, adv_eps)
    for mb in mbs:
        new = torch.tensor([adv[share.positions[i]] for i in mb.sample_index], dtype=mb.advantages.dtype,
                           device=mb.advantages.device).unsqueeze(-1)
        mb.advantages = torch.where(mb.loss_mask.bool(), new.expand_as(mb.advantages), torch.zeros_like(mb.advantages))
    return coef * sum(kl_sums) / max(1, len(kl_sums))
