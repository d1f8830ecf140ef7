"""Shadow-recompute audit of the proximal approximation, its fallback, and the drift signals.

A-3PO replaces recompute's forward pass by an approximation; metrics mode measures the approximation's
error by paying that forward pass every step. The audit measures it at a fraction of the cost (recipe
section ``audit``; docs/algorithm.md, "Audit"):

* with ``audit.enabled``, every ``audit.every`` steps it runs the step-start weights once more (forward
  only, no gradient) over a sampled ``audit.fraction`` of the step's micro-batches (at least one; the same
  choice on every TP/PP rank of a data-parallel replica: seeded by the run's seed and the step);
* while those micro-batches train, it compares the approximation the loss uses with those log-probs, per
  staleness bucket, with metrics mode's error measures (``loss.prox.approx_error_stats``: one
  implementation); the step's error of a bucket is the mean over every audited token of it;
* when a bucket's error (``audit.measure``) has stayed above ``audit.threshold`` for ``audit.patience``
  audits in a row, ``audit.policy`` acts once (until the error is back under the threshold): ``warn``
  logs it; ``tighten`` asks for a staleness bound below that bucket (``_staleness_cap``, applied by
  rollout/staleness.py on rank 0; never under ``audit.min_staleness``); ``recompute`` trains that
  bucket (``recompute_scope: bucket``: the forward pass over the whole step, the recomputed log-probs
  replace the approximation on the bucket's tokens) or the whole step (``step``: the step runs as
  ``trainer.mode=recompute``) with recomputed log-probs. The error is then measured every step, over the
  whole batch, and the fallback ends once it has been back under the threshold for ``audit.patience``
  steps in a row.

Every action is a dict in ``stats["_audit_actions"]`` (the loop writes them to steps.jsonl as
``actions``) with the step, the bucket, the measure, the error that triggered it and the threshold;
``audit/actions`` counts them for TensorBoard. Rank 0 decides; every rank learns the fallback (a broadcast
on the steps that measured an error).

Drift signals (for the adaptive staleness controller, every step while it is on): with
``rho = pi_theta / pi_behave`` per trained token (the current policy of the minibatch being trained), the
effective sample size fraction ``(sum rho)^2 / (n sum rho^2)`` and the k3 estimate of KL(pi_behave ||
pi_theta), ``mean(rho - 1 - log rho)``: ``drift/ess_frac`` and ``drift/kl``.

Cost: ``time/audit`` is the audit's forward pass plus its error and drift statistics, beside
``time/prox_logp``; ``audit/tokens_frac`` the share of the step's tokens the forward pass covered. A
recompute fallback's forward pass is training, not audit: it counts in ``time/prox_logp``.
"""

from __future__ import annotations

import logging
import math
import random
import time

import torch

from megatron_a3po import metrics as M
from megatron_a3po.platform import synchronize
from megatron_a3po.platform.ranks import broadcast_object

log = logging.getLogger("megatron_a3po.trainer.audit")

BUCKETS = M.APPROX_ERR_BUCKETS
_D_LO = {"d1": 1, "d2": 2, "d3": 3, "d4+": 4}  # the smallest staleness in each bucket (d1 holds d <= 1)
# the approximation each training mode uses (metrics mode's method names)
AUDITED_METHOD = {"loglinear": "loglinear", "linear": "linear", "coupled": "behave"}
# audit.measure -> metrics mode's tag of that error measure
MEASURES = {t.rsplit("/", 1)[1]: t for t in (M.APPROX_ERR_ABS, M.APPROX_ERR_SQ, M.APPROX_ERR_REL, M.APPROX_ERR_PROB_REL,
                                             M.APPROX_ERR_RATIO, M.APPROX_ERR_BEHAVE_W)}


def build_auditor(recipe) -> "Auditor | None":
    """The actor's auditor, given the recipe: None when neither the audit nor the adaptive staleness
    controller is on (then nothing of this module runs)."""
    a, ad = recipe.audit, recipe.adaptive_staleness
    if not a.enabled and not ad.enabled:
        return None
    return Auditor(a, mode=recipe.trainer.mode, alpha_schedule=recipe.loss.alpha_schedule,
                   schedule_kwargs=recipe.loss.alpha_kwargs(), seed=recipe.trainer.seed,
                   max_staleness=recipe.rollout.max_staleness, drift=ad.enabled)


def after_step(bound, step: int, stats: dict) -> tuple[dict, dict]:
    """Rank 0, after a step: read the audit's actions and cap (the private ``_audit_actions`` /
    ``_staleness_cap`` of ``stats``, left in place: private stats never reach the logs), let the staleness
    bound (rollout/staleness.py; None: not in use) follow them and the drift signal. Returns (what the
    step's record gets: ``{"actions": [...]}`` when something acted, the bound's stats to log)."""
    actions = list(stats.get("_audit_actions") or [])
    extra = {}
    if bound is not None:
        extra, changes = bound.update(step, stats)
        actions += changes
    return ({"actions": actions} if actions else {}), extra


class AuditPolicy:
    """The decision of the audit (rank 0): per bucket, how many audits in a row were over the threshold,
    and what the policy did about it. ``update`` takes one measurement (bucket -> error; buckets without
    audited tokens are absent) and returns the actions taken, as dicts."""

    def __init__(self, cfg, *, max_staleness: int):
        self.cfg = cfg
        self.max_staleness = max_staleness
        self.streak = dict.fromkeys(BUCKETS, 0)
        self.acted: set[str] = set()  # over the threshold, acted on (once per excursion)
        self.fallback: dict[str, int] = {}  # buckets trained with recomputed log-probs -> the step it began
        self.under = dict.fromkeys(BUCKETS, 0)  # in a fallback: measurements in a row under the threshold
        self.cap: int | None = None  # tighten: the staleness bound asked for

    def _action(self, step, bucket, error, action, **extra) -> dict:
        c = self.cfg
        return {"step": step, "source": "audit", "policy": c.policy, "bucket": bucket, "measure": c.measure,
                "error": error, "threshold": c.threshold, "action": action, **extra}

    def update(self, step: int, errors: dict[str, float]) -> list[dict]:
        c, out = self.cfg, []
        for b in BUCKETS:
            if b not in errors:
                continue
            e = float(errors[b])
            over = not e <= c.threshold  # NaN counts as over
            if b in self.fallback:  # measured every step: it ends after `patience` steps in a row under
                self.under[b] = self.under[b] + 1 if not over else 0
                if self.under[b] >= c.patience:
                    began = self.fallback.pop(b)
                    out.append(self._action(step, b, e, "recompute_end", recomputed_steps=step - began))
                    self.streak[b], self.under[b] = 0, 0
                    self.acted.discard(b)
                continue
            if not over:
                self.streak[b] = 0
                self.acted.discard(b)
                continue
            self.streak[b] += 1
            if self.streak[b] < c.patience or b in self.acted:
                continue
            self.acted.add(b)
            if c.policy == "warn":
                out.append(self._action(step, b, e, "warn", audits_over=self.streak[b]))
            elif c.policy == "tighten":
                want = max(c.min_staleness, _D_LO[b] - 1)
                now = self.max_staleness if self.cap is None else self.cap
                if want < now:
                    self.cap = want
                    out.append(self._action(step, b, e, "tighten", max_staleness=want, was=now,
                                            audits_over=self.streak[b]))
                else:
                    out.append(self._action(step, b, e, "tighten_at_floor", max_staleness=now,
                                            audits_over=self.streak[b]))
            else:
                self.fallback[b] = step
                self.under[b] = 0
                out.append(self._action(step, b, e, "recompute_start", scope=c.recompute_scope,
                                        audits_over=self.streak[b]))
        return out

    def state_dict(self) -> dict:
        return {"streak": dict(self.streak), "under": dict(self.under), "acted": sorted(self.acted),
                "fallback": dict(self.fallback), "cap": self.cap}

    def load_state_dict(self, sd: dict) -> None:
        self.streak = {b: int(sd["streak"].get(b, 0)) for b in BUCKETS}
        self.under = {b: int(sd["under"].get(b, 0)) for b in BUCKETS}
        self.acted, self.fallback, self.cap = set(sd["acted"]), dict(sd["fallback"]), sd["cap"]


class Auditor:
    """Owned by the actor, one per rank. ``begin`` (every step) returns the step's :class:`StepAudit`, or
    None when the step needs nothing of it (no audit, no fallback, no drift signals)."""

    def __init__(self, cfg, *, mode: str, alpha_schedule: str, schedule_kwargs: dict, seed: int,
                 max_staleness: int, drift: bool = False):
        if cfg.enabled and mode not in AUDITED_METHOD:
            raise ValueError(f"audit: trainer.mode={mode} has no approximation to audit")
        self.cfg, self.mode, self.seed, self.drift = cfg, mode, seed, drift
        self.method = AUDITED_METHOD.get(mode, "loglinear")
        self.alpha_schedule, self.schedule_kwargs = alpha_schedule, dict(schedule_kwargs)
        self.policy = AuditPolicy(cfg, max_staleness=max_staleness)
        self.last_audited: list = []  # the samples (TrainSample) the last audit's forward pass covered (tests)

    def is_audit_step(self, step_count: int) -> bool:
        """Step ``step_count + 1`` (1-based) is audited when it is a multiple of ``audit.every``."""
        return self.cfg.enabled and (step_count + 1) % self.cfg.every == 0

    def _sample(self, step_count: int, total: int) -> list[int]:
        k = min(total, max(1, math.ceil(self.cfg.fraction * total - 1e-9)))
        return sorted(random.Random(f"audit/{self.seed}/{step_count}").sample(range(total), k))

    def begin(self, actor, shares, minibatches, current_version: int, prox_timer) -> StepAudit | None:
        fb = self.policy.fallback
        audit = self.is_audit_step(actor.step_count)
        if not (audit or fb or self.drift):
            return None
        sa = StepAudit(self, current_version, actor.step_count + 1)
        if fb and self.cfg.recompute_scope == "step":
            sa.mode, sa.measuring, sa.all_recomputed = "recompute", True, True
            return sa  # the actor's recompute pass; the hook measures against it
        flat = [(k, mb) for k, mbs in enumerate(minibatches) for mb in mbs]
        if fb:  # bucket scope: the forward pass over the whole step, timed as training's proximal log-probs
            chosen = list(range(len(flat)))
        elif audit:
            chosen = self._sample(actor.step_count, len(flat))
        else:
            return sa  # drift signals only
        sa.measuring = True
        sel = [flat[i][1] for i in chosen]
        synchronize()
        t0 = time.perf_counter()
        actor.recompute_logprobs(sel)
        synchronize()
        dt = time.perf_counter() - t0
        if fb:
            prox_timer.add(dt)
            sa.replace = set(fb)
        else:
            sa.time += dt
        for mb in sel:
            sa.refs[id(mb)] = mb.prox_logp
            mb.prox_logp = None  # the loss of an approximating mode must not see it
        sa.tokens = float(sum(mb.num_tokens for mb in sel))
        sa.tokens_total = float(sum(mb.num_tokens for _, mb in flat))
        self.last_audited = [shares[k].samples[i] for k, mb in (flat[j] for j in chosen) for i in mb.sample_index]
        return sa


class StepAudit:
    """One step's audit: the reference log-probs of the audited micro-batches, the loss's hook, and the
    sums (over micro-batches, then ranks) that give the step's errors and drift signals."""

    def __init__(self, auditor: Auditor, current_version: int, step: int):
        self.a, self.V, self.step = auditor, current_version, step
        self.mode = auditor.mode
        self.measuring = False
        self.all_recomputed = False
        self.replace: set[str] = set()
        self.refs: dict[int, torch.Tensor | None] = {}
        self.sums: dict[str, float] = {}
        self.time = 0.0
        self.tokens = self.tokens_total = 0.0

    def _add(self, key: str, v: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(v)

    def hook(self, mb, prox: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """``loss.pipeline.policy_forward_step``'s prox_hook: measure, and (bucket fallback) replace."""
        from megatron_a3po.loss.prox import approx_error_stats, staleness_buckets

        t0 = time.perf_counter()
        dev = logp.device
        mask = mb.loss_mask.to(dev).bool()
        behave = mb.behave_logp.to(dev)
        versions = mb.versions.to(dev)
        if self.a.drift and bool(mask.any()):
            lr = (logp.double() - behave.double())[mask]
            rho = lr.exp()
            self._add("n", mask.sum())
            self._add("rho", rho.sum())
            self._add("rho2", (rho * rho).sum())
            self._add("k3", (rho - 1 - lr).sum())
        ref = prox if self.all_recomputed else self.refs.get(id(mb))
        if ref is not None:
            ref = ref.to(dev)
            a = self.a
            st = approx_error_stats(ref, behave, logp, versions, self.V, mask, methods=(a.method,),
                                    alpha_schedule=a.alpha_schedule, num_tokens=1, **a.schedule_kwargs)
            key = MEASURES[a.cfg.measure].format(method=a.method)
            for b in BUCKETS:  # num_tokens=1: sums over the bucket's tokens, and its token count
                self._add(f"err/{b}", st[f"{key}/{b}"])
                self._add(f"n/{b}", st[M.APPROX_ERR_BUCKET_FRAC.format(bucket=b)])
            if self.replace:
                bm = staleness_buckets(versions, self.V, mask)
                sel = torch.zeros_like(mask)
                for b in self.replace:
                    sel |= bm[b]
                prox = torch.where(sel, ref.to(prox.dtype), prox)
        synchronize()
        self.time += time.perf_counter() - t0
        return prox

    def partials(self) -> dict:
        return {**self.sums, "_time": self.time, "_tokens": self.tokens, "_tokens_total": self.tokens_total}

    def finish(self, gathered: list[dict] | None) -> dict:
        """Rank 0 (``gathered``: every logging rank's ``partials``): the step's audit stats and the
        policy's actions; every rank: learn the fallback decided (a broadcast, on steps that measured)."""
        a, out = self.a, {}
        if gathered is not None:
            tot: dict[str, float] = {}
            for g in gathered:
                for k, v in g.items():
                    tot[k] = max(tot.get(k, 0.0), v) if k == "_time" else tot.get(k, 0.0) + v
            out[M.TIME_AUDIT] = tot.get("_time", 0.0)
            if a.drift and tot.get("n", 0) > 0:
                out[M.DRIFT_ESS] = tot["rho"] ** 2 / (tot["n"] * tot["rho2"]) if tot["rho2"] > 0 else 0.0
                out[M.DRIFT_KL] = tot["k3"] / tot["n"]
            if self.measuring:
                errors = {b: tot[f"err/{b}"] / tot[f"n/{b}"] for b in BUCKETS if tot.get(f"n/{b}", 0) > 0}
                n_all = sum(tot.get(f"n/{b}", 0.0) for b in BUCKETS)
                if n_all > 0:
                    out[M.AUDIT_ERR] = sum(tot.get(f"err/{b}", 0.0) for b in BUCKETS) / n_all
                out.update({M.AUDIT_ERR_BUCKET.format(bucket=b): e for b, e in errors.items()})
                if not self.all_recomputed and tot.get("_tokens_total", 0) > 0:
                    out[M.AUDIT_TOKENS_FRAC] = tot["_tokens"] / tot["_tokens_total"]
                out[M.AUDIT_FALLBACK] = float(bool(self.replace or self.all_recomputed))
                actions = a.policy.update(self.step, errors)
                for act in actions:
                    why = (f"{act['audits_over']} audit(s) in a row over" if "audits_over" in act
                           else f"after {act['recomputed_steps']} recomputed step(s)")
                    log.warning("audit at step %d: bucket %s %s error %.4f vs threshold %g (%s): %s%s",
                                act["step"], act["bucket"], act["measure"], act["error"], act["threshold"], why,
                                act["action"], f" -> max_staleness {act['max_staleness']}" if "max_staleness" in act
                                else "")
                out["_audit_actions"] = actions
                out[M.AUDIT_ACTIONS] = float(len(actions))
                if a.policy.cap is not None:
                    out["_staleness_cap"] = a.policy.cap
        if self.measuring:
            a.policy.fallback = broadcast_object(dict(a.policy.fallback))
        return out
