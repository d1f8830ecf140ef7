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
"""

from __future__ import annotations

import torch

from megatron_a3po import metrics as M
from megatron_a3po.loss.prox import _compute_dtype

__all__ = ["decoupled_ppo_loss"]

CAP_MODES = ("mask", "clamp")


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


def decoupled_ppo_loss(logp: torch.Tensor, behave_logp: torch.Tensor, prox_logp: torch.Tensor,
                       advantages: torch.Tensor, loss_mask: torch.Tensor, *, eps_clip: float = 0.2,
                       eps_clip_high: float | None = None, dual_clip: float | None = None,
                       behave_weight_cap: float | None = None, behave_weight_cap_mode: str = "mask",
                       num_tokens=None, entropy: torch.Tensor | None = None):
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

    Returns:
        ``loss`` (0-dim, dtype fp32 or fp64 as the inputs), and ``stats``: detached tensors keyed by
        :mod:`megatron_a3po.metrics` names; combine micro-batches / ranks with
        :func:`megatron_a3po.loss.aggregate_stats` / :func:`megatron_a3po.loss.all_reduce_stats`
        (means are pre-divided by ``num_tokens`` and sum; max/min reduce with max/min).
    """
    _validate(logp, behave_logp, prox_logp, advantages, loss_mask, eps_clip, eps_clip_high, dual_clip,
              behave_weight_cap, behave_weight_cap_mode)
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

    pg1 = -adv * r
    pg2 = -adv * r.clamp(1.0 - eps_clip, 1.0 + eps_high)
    clipped = keep & (pg2 > pg1)                # the clipped term is active: zero gradient there
    pg = torch.where(pg2 > pg1, pg2, pg1)
    dual = torch.zeros_like(mask)
    if dual_clip is not None:
        bound = dual_clip * adv.abs()
        dual = keep & (adv < 0) & (pg > bound)
        pg = torch.where((adv < 0) & (pg > bound), bound, pg)
    loss = torch.where(keep, w * pg, zero).sum() / n

    with torch.no_grad():
        r_d = r.detach()
        inf = torch.tensor(float("inf"), dtype=dt, device=logp.device)
        stats = {
            M.PG_LOSS: loss.detach(),
            M.NUM_TOKENS: mask.sum(),
            M.RATIO_MAX: torch.where(mask, r_d, -inf).max() if mask.numel() else -inf,
            M.RATIO_MIN: torch.where(mask, r_d, inf).min() if mask.numel() else inf,
            M.RATIO_MEAN: torch.where(mask, r_d, zero).sum() / n,
            M.BEHAVE_W_MAX: torch.where(mask, w, -inf).max() if mask.numel() else -inf,
            M.BEHAVE_W_MEAN: torch.where(mask, w, zero).sum() / n,
            M.BEHAVE_W_CAPPED: capped.sum(),
            M.BEHAVE_W_CAPPED_FRAC: capped.sum().to(dt) / n,
            M.CLIP_COUNT: clipped.sum(),
            M.CLIP_FRAC: clipped.sum().to(dt) / n,
            M.DUAL_CLIP_COUNT: dual.sum(),
            # k3 estimator of KL(pi_prox || pi_theta) over masked tokens: E[(r - 1) - log r] >= 0
            M.APPROX_KL: torch.where(mask, torch.expm1(log_r.detach()) - log_r.detach(), zero).sum() / n,
        }
        if entropy is not None:
            if entropy.shape != logp.shape:
                raise ValueError(f"entropy shape {tuple(entropy.shape)} must equal logp shape {tuple(logp.shape)}")
            stats[M.ENTROPY] = torch.where(mask, entropy.detach().to(dt), zero).sum() / n
    return loss, stats
