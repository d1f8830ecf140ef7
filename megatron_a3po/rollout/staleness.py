"""The rollout's admission bound as the trainer's drift checks move it (rank 0; docs/algorithm.md,
"Audit" and "Staleness that follows drift").

One owner: :class:`StalenessBound`. The recipe's ``rollout.max_staleness`` is the hard ceiling, never
exceeded; the audit's ``tighten`` policy lowers a cap under it (``stats["_staleness_cap"]``, kept for the
rest of the run); the optional adaptive controller (recipe ``adaptive_staleness``, :class:`DriftController`)
moves the bound between its floor and that cap. After every step, :meth:`StalenessBound.update` sets the
bound in force for admission (``apply``: the rollout controller's ``set_max_staleness``) and returns the
stats logged every step (``staleness/bound``, the smoothed drift signal) and the changes, as action dicts.

Stability (no oscillation): the signal is smoothed (an exponential moving average); a change needs the
smoothed signal outside the band ``[low, high]`` for ``patience`` measurements in a row; a change is one
version at a time, and is followed by ``cooldown`` steps without another (the groups in flight were
admitted under the old bound, so the signal answers a change only a few steps later).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

from megatron_a3po import metrics as M

log = logging.getLogger("megatron_a3po.rollout.staleness")


def drift_signal(name: str, stats: dict) -> float | None:
    """The adaptive controller's drift (higher = the policy moved further from the behaviour policy) from a
    step's stats: the audit's error (audit steps only; None otherwise), 1 - the ESS fraction, or the KL."""
    if name == "audit":
        v = stats.get(M.AUDIT_ERR)
    elif name == "ess":
        v = stats.get(M.DRIFT_ESS)
        v = None if v is None else 1.0 - v
    elif name == "kl":
        v = stats.get(M.DRIFT_KL)
    else:
        raise ValueError(f"adaptive_staleness.signal: unknown signal {name!r}")
    return None if v is None or not math.isfinite(v) else float(v)


class DriftController:
    """An integer bound between ``floor`` and a ceiling, from a drift signal (see the module docstring)."""

    def __init__(self, *, floor: int, high: float, low: float, patience: int, cooldown: int, smoothing: float):
        if not low < high:
            raise ValueError(f"adaptive staleness: low={low} must be below high={high}")
        self.floor, self.high, self.low = floor, high, low
        self.patience, self.cooldown, self.smoothing = patience, cooldown, smoothing
        self.ema: float | None = None
        self.over = self.under = 0
        self.since_change = cooldown  # a first change may come as soon as the signal asks for it

    def update(self, signal: float | None, bound: int, ceiling: int) -> int:
        """One step: the new bound (``bound`` unchanged unless the signal has asked long enough)."""
        if signal is not None:
            s = self.smoothing
            self.ema = signal if self.ema is None else s * self.ema + (1 - s) * signal
            self.over = self.over + 1 if self.ema > self.high else 0
            self.under = self.under + 1 if self.ema < self.low else 0
        self.since_change += 1
        if self.since_change <= self.cooldown:
            return bound
        new = bound
        if self.over >= self.patience and bound > self.floor:
            new = bound - 1
        elif self.under >= self.patience and bound < ceiling:
            new = bound + 1
        if new != bound:
            self.over = self.under = 0
            self.since_change = 0
        return new

    def state_dict(self) -> dict:
        return {"ema": self.ema, "over": self.over, "under": self.under, "since_change": self.since_change}

    def load_state_dict(self, sd: dict) -> None:
        self.ema, self.over, self.under, self.since_change = sd["ema"], sd["over"], sd["under"], sd["since_change"]


class StalenessBound:
    """See the module docstring. ``apply(n)`` sets the rollout controller's admission bound."""

    def __init__(self, max_staleness: int, apply: Callable[[int], object], *,
                 controller: DriftController | None = None, signal: str = "kl"):
        self.hard = int(max_staleness)
        self.apply = apply
        self.controller, self.signal = controller, signal
        self.cap: int | None = None
        self.bound = self.hard

    @classmethod
    def from_recipe(cls, recipe, apply: Callable[[int], object]) -> "StalenessBound | None":
        """None unless the audit may tighten the bound or the adaptive controller is on."""
        a, ad = recipe.audit, recipe.adaptive_staleness
        if not ad.enabled and not (a.enabled and a.policy == "tighten"):
            return None
        ctl = None
        if ad.enabled:
            ctl = DriftController(floor=ad.floor, high=ad.high, low=ad.low, patience=ad.patience,
                                  cooldown=ad.cooldown, smoothing=ad.smoothing)
        return cls(recipe.rollout.max_staleness, apply, controller=ctl, signal=ad.signal)

    @property
    def ceiling(self) -> int:
        return self.hard if self.cap is None else min(self.hard, self.cap)

    def update(self, step: int, stats: dict) -> tuple[dict, list[dict]]:
        """After step ``step`` (1-based): read the audit's cap and the drift signal from its stats, set the
        bound; returns (stats to log, changes as action dicts)."""
        cap = stats.get("_staleness_cap")
        if cap is not None:
            self.cap = int(cap) if self.cap is None else min(self.cap, int(cap))
        new = self.bound
        sig = None
        if self.controller is not None:
            sig = drift_signal(self.signal, stats)
            new = self.controller.update(sig, self.bound, self.ceiling)
        new = max(0, min(new, self.ceiling))
        actions = []
        if new != self.bound:
            by = "audit" if self.controller is None or new == self.ceiling < self.bound else "adaptive_staleness"
            act = {"step": step, "source": "staleness_bound", "by": by,
                   "action": "lower" if new < self.bound else "raise", "max_staleness": new, "was": self.bound}
            if self.controller is not None:
                act.update(signal=self.signal, value=sig, smoothed=self.controller.ema)
            log.info("staleness bound %d -> %d after step %d (%s)", self.bound, new, step, by)
            self.apply(new)
            self.bound = new
            actions.append(act)
        assert self.bound <= self.hard
        out = {M.STALENESS_BOUND: float(self.bound)}
        if self.controller is not None and self.controller.ema is not None:
            out[M.STALENESS_DRIFT] = self.controller.ema
        return out, actions

    def state_dict(self) -> dict:
        return {"bound": self.bound, "cap": self.cap,
                "controller": self.controller.state_dict() if self.controller is not None else None}

    def load_state_dict(self, sd: dict) -> None:
        self.bound, self.cap = int(sd["bound"]), sd["cap"]
        if self.controller is not None and sd.get("controller"):
            self.controller.load_state_dict(sd["controller"])
        self.apply(self.bound)
