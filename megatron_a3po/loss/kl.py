"""KL to a reference policy: Schulman's k1, k2, k3 estimators, per token.

With ``x`` the log-prob of the sampled token under the policy being regularised and ``ref`` its
log-prob under the reference policy, ``log q = ref - x``::

    k1 = x - ref                      = -log q
    k2 = (x - ref)^2 / 2              = (log q)^2 / 2
    k3 = exp(ref - x) - 1 - (ref - x) = (q - 1) - log q        (>= 0)

On samples from the policy itself, E[k1] = E[k3] = KL(policy || ref) and E[k2] is its second-order
approximation; the gradient flows through ``x`` only. In the loss (``loss.kl_in = loss``) ``x`` is the
trained policy's log-prob (the samples come from the behaviour policy, as in GRPO and verl: no
importance weight on the KL term); in the reward (``kl_in = reward``) ``x`` is the behaviour log-prob
and the per-sample sum is subtracted from the reward before the group advantages
(``trainer.reference.kl_penalised_advantages``).
"""

from __future__ import annotations

import torch

__all__ = ["KL_ESTIMATORS", "kl_estimate"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate (module docstring); differentiable w.r.t. ``logp``, ``ref_logp`` detached."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"loss.kl_estimator: unknown estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} must equal logp shape {tuple(logp.shape)}")
    log_q = ref_logp.detach().to(logp.dtype) - logp
    if estimator == "k1":
        return -log_q
    if estimator == "k2":
        return 0.5 * log_q * log_q
    return torch.expm1(log_q) - log_q
