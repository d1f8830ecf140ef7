"""The decoupled clipped PPO objective (Hilton et al.; A-3PO paper eq. 2) and its coupled special case.

Per masked token (``lt`` = logp with gradient, ``lp`` = stopgrad(prox_logp), ``lb`` = behave_logp)::

    r   = exp(lt - lp)                                           importance ratio to the proximal policy
    pg  = max(-A * r, -A * clip(r, 1 - eps_clip, 1 + eps_clip_high))
    pg  = min(pg, dual_clip * |A|)            for A < 0, when dual_clip (c > 1) is set
    w   = stopgrad(exp(lp - lb))                                 behaviour weight, fp32 (or fp64), ALWAYS applied
    l   = w * pg
    loss = sum(mask * l) / N                  N = global masked-token count, before cap masking

so ``w * r = exp(lt - lb)``: the whole off-policy correction is kept, and only ``r`` is clipped. Optional
``behave_weight_cap``: tokens with w > cap are dropped from the numerator (mode "mask") or have w clamped
to cap (mode "clamp"); N is unchanged. Coupled PPO / GRPO is the same call with ``prox_logp = behave_logp``
(then w == 1 exactly). Gradient w.r.t. logp: ``-w * r * A / N`` where the unclipped term is active, else 0;
no gradient reaches ``prox_logp``, ``behave_logp`` or ``w``.

Options (all off by default; docs/algorithm.md has a section on each):

* ``pg_variant``: ``ppo`` (above); ``gspo``: ``r`` is replaced by the sequence's geometric-mean ratio
  ``s_i = exp(mean_{t in seq} (lt - lp))`` carrying each token's gradient (GSPO-token: value ``s_i``,
  gradient ``s_i * grad lt``); ``cispo``: ``pg = -A * stopgrad(clip(r, 1 - eps_clip, 1 + eps_clip_high)) * lt``
  (the clip bounds the weight, the gradient never vanishes).
* ``correction``: truncated / masked importance sampling (loss/correction.py), after the cap.
* ``token_scale``: per-token coefficients of a non-default aggregation (loss/aggregate.py) replacing 1 / N.
* ``ref_logp`` with ``kl_coef`` > 0: ``+ kl_coef * k(lt, ref)`` per masked token (loss/kl.py), with the same
  coefficients.
"""

from __future__ import annotations

import torch

from megatron_a3po import metrics as M
from megatron_a3po.loss.aggregate import count_sequences, default_seq_ids, seq_sum, seq_token_count
from megatron_a3po.loss.correction import Correction, apply_correction
from megatron_a3po.loss.kl import kl_estimate
from megatron_a3po.loss.prox import _compute_dtype

__all__ = ["decoupled_ppo_loss", "PG_VARIANTS"]

CAP_MODES = ("mask", "clamp")
PG_VARIANTS = ("ppo", "gspo", "cispo")


def _validate(logp, behave_logp, prox_logp, advantages, loss_mask, eps_clip, eps_clip_high, dual_clip,
              behave_weight_cap, behave_weight_cap_mode):
    named = dict(behave_logp=behave_logp, prox_logp=prox_logp, advantages=advantages, loss_mask=loss_mask)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.shape != logp.shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} shape {got} must equal logp shape {tuple(logp.shape)}")
    if bool(torch.isnan(behave_logp).any()):
        raise ValueError("behave_logp contains NaN")
    if not bool(torch.isfinite(prox_logp).all()):
        raise ValueError("prox_logp contains NaN/Inf")
    if not eps_clip > 0:
        raise ValueError(f"eps_clip must be > 0, got {eps_clip!r}")
    if eps_clip_high is not None and not eps_clip_high > 0:
        raise ValueError(f"eps_clip_high must be > 0, got {eps_clip_high!r}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
    if behave_weight_cap is not None and not behave_weight_cap > 0:
        raise ValueError(f"behave_weight_cap must be > 0, got {behave_weight_cap!r}")
    if behave_weight_cap_mode not in CAP_MODES:
        raise ValueError(f"behave_weight_cap_mode must be one of {CAP_MODES}, got {behave_weight_cap_mode!r}")


def _validate_options(logp, pg_variant, dual_clip, correction, seq_ids, token_scale, ref_logp, kl_coef):
    if pg_variant not in PG_VARIANTS:
        raise ValueError(f"loss.pg_variant: unknown variant {pg_variant!r}; expected one of {PG_VARIANTS}")
    if pg_variant == "cispo" and dual_clip is not None:
        raise ValueError("dual_clip does not apply to pg_variant=cispo (its clipped weight is already bounded)")
    if correction is not None and not isinstance(correction, Correction):
        raise ValueError(f"correction must be a loss.correction.Correction, got {type(correction).__name__}")
    for name, t in dict(seq_ids=seq_ids, token_scale=token_scale, ref_logp=ref_logp).items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != logp.shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} shape {got} must equal logp shape {tuple(logp.shape)}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference policy's log-probs)")


def decoupled_ppo_loss(logp: torch.Tensor, behave_logp: torch.Tensor, prox_logp: torch.Tensor,
                       advantages: torch.Tensor, loss_mask: torch.Tensor, *, eps_clip: float = 0.2,
                       eps_clip_high: float | None = None, dual_clip: float | None = None,
                       behave_weight_cap: float | None = None, behave_weight_cap_mode: str = "mask",
                       num_tokens=None, entropy: torch.Tensor | None = None, pg_variant: str = "ppo",
                       correction: Correction | None = None, seq_ids: torch.Tensor | None = None, num_seqs=None,
                       token_scale: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                       kl_coef: float = 0.0, kl_estimator: str = "k3"):
    """Decoupled PPO loss of one micro-batch (math: module docstring). Returns ``(loss, stats)``.

    Args:
        logp: per-position log-probs of the sampled tokens under the trained policy, with gradient.
        behave_logp, prox_logp, advantages, loss_mask: same shape, same per-position alignment.
            Positions with ``loss_mask == 0`` contribute exactly 0 to loss and gradient whatever their
            values (but NaN in ``behave_logp`` or NaN/Inf in ``prox_logp`` anywhere is an upstream error).
        eps_clip, eps_clip_high: clip range ``[1 - eps_clip, 1 + eps_clip_high]`` (high defaults to low).
        dual_clip: c > 1 enables the dual clip for A < 0.
        behave_weight_cap, behave_weight_cap_mode: optional cap on w ("mask" drops, "clamp" clamps).
        num_tokens: masked-token count of the WHOLE minibatch (all micro-batches, all DP ranks), counted
            before cap masking; default: this micro-batch's count. Summing the micro-batch losses then
            gives the minibatch token mean whatever the split.
        entropy: optional per-position entropy, only reported as ``entropy/mean`` (no loss term).
        pg_variant, correction, token_scale, ref_logp / kl_coef / kl_estimator: the options of the module
            docstring. seq_ids: per-position sequence ids (default: one sequence per row); num_seqs: the
            WHOLE minibatch's sequence count (default: this micro-batch's), for sequence-level shares.

    Returns:
        ``loss`` (0-dim, dtype fp32 or fp64 as the inputs), and ``stats``: detached tensors keyed by
        :mod:`megatron_a3po.metrics` names; combine micro-batches / ranks with
        :func:`megatron_a3po.loss.aggregate_stats` / :func:`megatron_a3po.loss.all_reduce_stats`
        (means are pre-divided by ``num_tokens`` and sum; max/min reduce with max/min).
    """
    _validate(logp, behave_logp, prox_logp, advantages, loss_mask, eps_clip, eps_clip_high, dual_clip,
              behave_weight_cap, behave_weight_cap_mode)
    _validate_options(logp, pg_variant, dual_clip, correction, seq_ids, token_scale, ref_logp, kl_coef)
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high
    dt = _compute_dtype(logp, behave_logp, prox_logp)
    mask = loss_mask.bool()
    zero = torch.zeros((), dtype=dt, device=logp.device)
    n = (mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=logp.device)).to(dt).clamp(min=1)

    lp = torch.where(mask, prox_logp.detach().to(dt), zero)
    lb = torch.where(mask, behave_logp.detach().to(dt), zero)
    adv = torch.where(mask, advantages.detach().to(dt), zero)
    lt = torch.where(mask, logp.to(dt), zero)   # gradient flows only here, and only at masked positions

    log_r = lt - lp
    r = torch.exp(log_r)
    w = torch.exp(lp - lb)                      # detached: built from detached tensors only
    keep = mask
    capped = torch.zeros_like(mask)
    if behave_weight_cap is not None:
        capped = mask & (w > behave_weight_cap)
        if behave_weight_cap_mode == "mask":
            keep = mask & ~capped
        else:
            w = w.clamp(max=behave_weight_cap)

    w_behave = w                                # the logged behaviour weight: before the rollout correction
    extra = {}
    if (correction is not None and correction.needs_sequences) or pg_variant == "gspo":
        seq_ids = default_seq_ids(mask) if seq_ids is None else seq_ids
    if correction is not None and correction.active:
        n_seq = count_sequences(mask, seq_ids) if num_seqs is None else num_seqs
        w, keep, extra = apply_correction(correction, w, lp - lb, lt.detach() - lb, mask, keep, seq_ids,
                                          num_tokens=n, num_seqs=n_seq)

    ratio = r
    if pg_variant == "gspo":   # s_i = exp(mean over the sequence of log r): value s_i, gradient s_i * grad lt
        log_s = seq_sum(log_r.detach(), mask, seq_ids) / seq_token_count(mask, seq_ids, dt).clamp(min=1)
        ratio = torch.exp(log_s + (lt - lt.detach()))
    pg, clipped, dual = _pg_term(pg_variant, adv, r, ratio, lt, keep, 1.0 - eps_clip, 1.0 + eps_high, dual_clip)
    if token_scale is None:
        loss = torch.where(keep, w * pg, zero).sum() / n
    else:
        c = token_scale.detach().to(dt)
        loss = torch.where(keep, w * pg * c, zero).sum()
    if kl_coef:
        kl = torch.where(mask, kl_estimate(lt, torch.where(mask, ref_logp.detach().to(dt), zero), kl_estimator), zero)
        kl_term = kl.sum() / n if token_scale is None else (kl * c).sum()
        loss = loss + kl_coef * kl_term
        extra[M.KL_REF] = kl.detach().sum() / n

    stats = _stats(loss, mask, r, w_behave, capped, clipped, dual, log_r, n, extra, entropy)
    return loss, stats


def _pg_term(pg_variant: str, adv, r, ratio, lt, keep, lo: float, hi: float, dual_clip: float | None):
    """The per-token policy-gradient term before the behaviour weight, and the masks of the tokens the
    clip (``clipped``) and the dual clip (``dual``) act on."""
    dual = torch.zeros_like(keep)
    if pg_variant == "cispo":  # REINFORCE with a clipped, stop-gradient weight: no token loses its gradient
        return -adv * r.detach().clamp(lo, hi) * lt, keep & ((r < lo) | (r > hi)), dual
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(lo, hi)
    clipped = keep & (pg2 > pg1)                # the clipped term is active: zero gradient there
    pg = torch.where(pg2 > pg1, pg2, pg1)
    if dual_clip is not None:
        bound = dual_clip * adv.abs()
        dual = keep & (adv < 0) & (pg > bound)
        pg = torch.where((adv < 0) & (pg > bound), bound, pg)
    return pg, clipped, dual


@torch.no_grad()
def _stats(loss, mask, r, w_behave, capped, clipped, dual, log_r, n, extra: dict, entropy) -> dict:
    """The logged statistics of one micro-batch (detached; means pre-divided by ``n``)."""
    dt = n.dtype
    zero = torch.zeros((), dtype=dt, device=r.device)
    r_d = r.detach()
    inf = torch.tensor(float("inf"), dtype=dt, device=r.device)
    stats = {
        M.PG_LOSS: loss.detach(),
        M.NUM_TOKENS: mask.sum(),
        M.RATIO_MAX: torch.where(mask, r_d, -inf).max() if mask.numel() else -inf,
        M.RATIO_MIN: torch.where(mask, r_d, inf).min() if mask.numel() else inf,
        M.RATIO_MEAN: torch.where(mask, r_d, zero).sum() / n,
        M.BEHAVE_W_MAX: torch.where(mask, w_behave, -inf).max() if mask.numel() else -inf,
        M.BEHAVE_W_MEAN: torch.where(mask, w_behave, zero).sum() / n,
        M.BEHAVE_W_CAPPED: capped.sum(),
        M.BEHAVE_W_CAPPED_FRAC: capped.sum().to(dt) / n,
        M.CLIP_COUNT: clipped.sum(),
        M.CLIP_FRAC: clipped.sum().to(dt) / n,
        M.DUAL_CLIP_COUNT: dual.sum(),
        # k3 estimator of KL(pi_prox || pi_theta) over masked tokens: E[(r - 1) - log r] >= 0
        M.APPROX_KL: torch.where(mask, torch.expm1(log_r.detach()) - log_r.detach(), zero).sum() / n,
    }
    stats.update(extra)
    if entropy is not None:
        if entropy.shape != mask.shape:
            raise ValueError(f"entropy shape {tuple(entropy.shape)} must equal logp shape {tuple(mask.shape)}")
        stats[M.ENTROPY] = torch.where(mask, entropy.detach().to(dt), zero).sum() / n
    return stats
