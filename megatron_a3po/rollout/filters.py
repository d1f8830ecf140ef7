"""Reward and group filters on the rollout side: dynamic sampling under async, DAPO's overlong handling.

**Dynamic sampling** (DAPO, Yu et al. 2025, "dynamic sampling"; recipe ``rollout.dynamic_sampling``). A
group whose rewards are all equal has zero GRPO advantages: it costs a training step's compute and
moves nothing. The controller asks :class:`DynamicSampler` about every group when it finishes; a
constant group is dropped there, before it reaches any batch, and its prompt is not re-queued (its
answers agreed). Admission then starts another group from the prompt stream: the replacement passes
the same admission rule and the same final staleness filter as every group, so it is as fresh as any.

* ``refill``: every batch still holds ``batch_groups`` groups (more generation per batch).
* ``shrink``: a batch holds ``batch_groups`` minus the groups dropped since the last batch, at least
  ``min_groups`` (no extra generation; smaller batches).
* The bound: after ``max_drops`` drops since the last batch the sampler lets constant groups through
  (they train with zero advantages) and warns once per batch, so a prompt set whose every group is
  constant (a collapsed policy, a broken reward) cannot stall the run.

Counters (``rollout/ds_*``): groups, samples and generated tokens dropped (the extra generation),
groups let through past the bound, and the drops before the last batch.

**Overlong handling** (DAPO, "overlong reward shaping" and "overlong filtering"). With ``L = max_new_tokens``
and a buffer ``B`` (``rollout.overlong_buffer``), a response of ``n`` tokens gets the reward penalty::

    0                              n <= L - B
    factor * (L - B - n) / B       L - B < n <= L          (from 0 down to -factor at n = L)

added to its task reward before the group advantages (:func:`overlong_penalty`). ``mask_truncated``
(:func:`drop_truncated`) takes samples cut at ``max_new_tokens`` (finish reason ``length``) out of the
trained batch after the advantages were computed: they count in their group's mean and std but not in
the loss, as DAPO's overlong filtering masks their loss.
"""

from __future__ import annotations

import logging
from collections import Counter

from megatron_a3po.rollout.types import Sample

__all__ = ["DS_MODES", "DynamicSampler", "is_constant_group", "overlong_penalty", "shape_rewards", "drop_truncated"]

log = logging.getLogger("megatron_a3po.rollout.filters")

DS_MODES = ("off", "refill", "shrink")


def is_constant_group(samples: list[Sample]) -> bool:
    """All rewards of the group equal (its GRPO advantages are all zero)."""
    rewards = [s.reward for s in samples]
    return len(rewards) > 0 and max(rewards) == min(rewards)


class DynamicSampler:
    """Decides, per finished group, whether it joins the ready pool (module docstring)."""

    def __init__(self, mode: str, batch_groups: int, *, max_drops: int | None = None, min_groups: int = 1,
                 counters: Counter | None = None):
        if mode not in DS_MODES[1:]:
            raise ValueError(f"rollout.dynamic_sampling: unknown mode {mode!r}; expected one of {DS_MODES}")
        if max_drops is not None and max_drops < 1:
            raise ValueError(f"rollout.dynamic_sampling_max_drops must be >= 1, got {max_drops}")
        self.mode, self.batch_groups = mode, batch_groups
        self.max_drops = 4 * batch_groups if max_drops is None else max_drops
        self.min_groups = max(1, min_groups)
        self.counters = Counter() if counters is None else counters
        self.dropped_since = 0   # drops since the last delivered batch
        self._warned = False

    def keep(self, samples: list[Sample]) -> bool:
        """False: the group is dropped (counted). A constant group past the bound is kept, with a warning."""
        if not is_constant_group(samples):
            return True
        if self.dropped_since >= self.max_drops:
            self.counters["ds_groups_let_through"] += 1
            if not self._warned:
                self._warned = True
                log.warning("dynamic sampling: %d groups with all-equal rewards dropped since the last batch "
                            "(bound rollout.dynamic_sampling_max_drops=%d); letting constant groups through "
                            "(zero advantages) so the run does not stall. Is the reward constant, or the policy "
                            "collapsed?", self.dropped_since, self.max_drops)
            return True
        self.dropped_since += 1
        self.counters["ds_groups_dropped"] += 1
        self.counters["ds_samples_dropped"] += len(samples)
        self.counters["ds_tokens_dropped"] += sum(len(s.response_ids) for s in samples)
        return False

    def groups_needed(self, num_groups: int) -> int:
        """How many ready groups the next batch takes."""
        if self.mode == "refill":
            return num_groups
        return min(num_groups, max(self.min_groups, num_groups - self.dropped_since))

    def delivered(self) -> None:
        self.counters["ds_dropped_last_batch"] = self.dropped_since
        self.dropped_since = 0
        self._warned = False


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong penalty of a response of ``length`` tokens (module docstring); 0 when off."""
    if buffer <= 0:
        return 0.0
    if not 0 < buffer < max_new_tokens:
        raise ValueError(f"rollout.overlong_buffer={buffer} must be in (0, max_new_tokens={max_new_tokens})")
    safe = max_new_tokens - buffer
    if length <= safe:
        return 0.0
    return factor * (safe - min(length, max_new_tokens)) / buffer


def shape_rewards(samples: list[Sample], rewards: list[float], *, max_new_tokens: int, buffer: int,
                  factor: float, counters: Counter | None = None) -> list[float]:
    """The group's rewards with the overlong penalty added (what the advantages are computed from)."""
    out = []
    for s, r in zip(samples, rewards):
        p = overlong_penalty(len(s.response_ids), max_new_tokens, buffer, factor)
        if p and counters is not None:
            counters["overlong_penalised"] += 1
            counters["overlong_penalty_sum"] += p
        out.append(r + p)
    return out


def drop_truncated(groups: list[list[Sample]]) -> tuple[list[list[Sample]], int]:
    """The groups without their samples cut at max_new_tokens (``finish_reason == "length"``); groups
    left empty go. Returns ``(groups, number of samples taken out)``."""
    out, n = [], 0
    for g in groups:
        kept = [s for s in g if s.finish_reason != "length"]
        n += len(g) - len(kept)
        if kept:
            out.append(kept)
    return out, n
