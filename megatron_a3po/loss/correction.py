"""Rollout correction: truncated (TIS) and masked (MIS) importance sampling against the engine's
log-probs, at token, sequence or geometric-mean level, and the engine/trainer mismatch metrics.

The decoupled loss already carries the behaviour weight ``w = pi_prox / pi_behav`` per token
(docs/algorithm.md). Here, with ``lb`` the engine's (behaviour) log-probs, ``lp`` the proximal ones and
``lt`` the trained policy's (detached), per masked token::

    log rho_prox  = lp - lb         the behaviour weight's log: what TIS truncates, and what MIS reads
                                    with mis_ratio = prox
    log rho_theta = lt - lb         the whole off-policy ratio pi_theta / pi_behav: MIS with
                                    mis_ratio = theta (ICEPOP's trainer/engine ratio, without a recompute)

and a *level* turns a per-token log-ratio into the value each token is judged by:

    token       log rho_i
    sequence    sum_{j in s(i)} log rho_j                 (the sequence's ratio, prod_j rho_j)
    geometric   (1 / T_s) sum_{j in s(i)} log rho_j       (its geometric mean per token)

* **TIS** (``tis_level``, cap ``C``): the behaviour weight of token i becomes ``min(w_i, C)`` (token; C =
  +inf leaves w bit for bit) or ``min(rho_level(i), C)`` for every token of the sequence (sequence,
  geometric): the sequence's weight replaces the per-token ones.
* **MIS** (``mis_level``, bounds ``[lo, hi]``): token i (token) or every token of its sequence
  (sequence, geometric) is dropped from the loss's numerator unless ``lo <= rho_level <= hi``; the
  normalisers (N, N_seq, T_s) are unchanged, as for ``behave_weight_cap``. One-sided MIS (Yao et al.)
  is ``lo = 0``; ICEPOP's two-sided token mask is ``mis_level = token`` with ``lo > 0`` and ``hi < inf``.
  ``lo = 0, hi = inf`` keeps everything and is a no-op bit for bit.

Order: ``behave_weight_cap`` (if set), then MIS, then TIS. The sequence-level ratios always use the raw
``lp - lb``, not a capped w. Stats: share of tokens (and, at sequence levels, of sequences) truncated /
masked, and the mean / max of the final weight.

Mismatch (``mismatch_stats``): with ``lr`` the engine's log-prob and ``lt`` a trainer log-prob of the same
token, ``k1 = lr - lt`` and ``k3 = (rho - 1) - log rho`` with ``rho = exp(lt - lr)``: both estimate
KL(pi_engine || pi_trainer) on the engine's samples (k3 >= 0 per token). Overall and per staleness
bucket. Which trainer log-prob is used, and what that makes the metric mean, is in docs/algorithm.md
("Mismatch metrics").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_a3po import metrics as M
from megatron_a3po.loss.aggregate import count_sequences, seq_sum, seq_token_count

__all__ = ["LEVELS", "MIS_RATIOS", "Correction", "level_log_ratio", "apply_correction", "mismatch_stats"]

LEVELS = ("off", "token", "sequence", "geometric")
MIS_RATIOS = ("prox", "theta")


@dataclass(frozen=True)
class Correction:
    """Rollout-correction settings (recipe ``loss.tis_*`` / ``loss.mis_*``); all off by default."""

    tis_level: str = "off"
    tis_cap: float = math.inf
    mis_level: str = "off"
    mis_ratio: str = "prox"
    mis_low: float = 0.0
    mis_high: float = math.inf

    def __post_init__(self):
        for key in ("tis_level", "mis_level"):
            if getattr(self, key) not in LEVELS:
                raise ValueError(f"loss.{key}: unknown level {getattr(self, key)!r}; expected one of {LEVELS}")
        if self.mis_ratio not in MIS_RATIOS:
            raise ValueError(f"loss.mis_ratio: unknown ratio {self.mis_ratio!r}; expected one of {MIS_RATIOS}")
        if not self.tis_cap > 0:
            raise ValueError(f"loss.tis_cap must be > 0, got {self.tis_cap!r}")
        if not (0 <= self.mis_low < self.mis_high):
            raise ValueError(f"loss.mis_low / mis_high must satisfy 0 <= low < high, got {self.mis_low!r}, "
                             f"{self.mis_high!r}")

    @property
    def active(self) -> bool:
        return self.tis_level != "off" or self.mis_level != "off"

    @property
    def needs_sequences(self) -> bool:
        return self.tis_level in ("sequence", "geometric") or self.mis_level in ("sequence", "geometric")


def level_log_ratio(log_rho: torch.Tensor, mask: torch.Tensor, seq_ids: torch.Tensor, level: str) -> torch.Tensor:
    """Per masked token, the log-ratio of ``level`` (token / sequence / geometric); 0 off the mask."""
    m = mask.bool()
    x = torch.where(m, log_rho.detach(), torch.zeros_like(log_rho))
    if level == "token":
        return x
    s = seq_sum(x, m, seq_ids)
    if level == "sequence":
        return s
    if level == "geometric":
        return s / seq_token_count(m, seq_ids, s.dtype).clamp(min=1)
    raise ValueError(f"unknown level {level!r}; expected one of {LEVELS[1:]}")


def _log_bound(x: float) -> float:
    return -math.inf if x == 0 else math.log(x)


def apply_correction(corr: Correction, w: torch.Tensor, log_w: torch.Tensor, log_rt: torch.Tensor,
                     mask: torch.Tensor, keep: torch.Tensor, seq_ids: torch.Tensor, *, num_tokens: torch.Tensor,
                     num_seqs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """MIS then TIS (module docstring). ``w``: the behaviour weight after ``behave_weight_cap``;
    ``log_w = lp - lb`` and ``log_rt = lt - lb`` (detached), 0 off the mask; ``keep``: the tokens still
    in the numerator. ``num_tokens`` / ``num_seqs``: the global counts the shares are divided by.
    Returns the new ``(w, keep, stats)``."""
    m = mask.bool()
    dt = w.dtype
    zero = torch.zeros((), dtype=dt, device=w.device)
    n = num_tokens
    n_seq = float(max(1, int(num_seqs)))
    stats: dict[str, torch.Tensor] = {}
    if corr.mis_level != "off":
        lvl = level_log_ratio(log_w if corr.mis_ratio == "prox" else log_rt, m, seq_ids, corr.mis_level)
        rejected = m & ~((lvl >= _log_bound(corr.mis_low)) & (lvl <= _log_bound(corr.mis_high)))
        keep = keep & ~rejected
        stats[M.CORR_MIS_TOKEN_FRAC] = rejected.sum().to(dt) / n
        if corr.mis_level != "token":
            stats[M.CORR_MIS_SEQ_FRAC] = torch.tensor(count_sequences(rejected, seq_ids) / n_seq, dtype=dt,
                                                      device=w.device)
    if corr.tis_level != "off":
        if corr.tis_level == "token":
            truncated = keep & (w > corr.tis_cap)
            w = w.clamp(max=corr.tis_cap)        # a cap of +inf returns w bit for bit
        else:
            lvl = level_log_ratio(log_w, m, seq_ids, corr.tis_level)
            log_cap = math.log(corr.tis_cap) if math.isfinite(corr.tis_cap) else math.inf
            truncated = keep & (lvl > log_cap)
            w = torch.exp(lvl.clamp(max=log_cap))
            stats[M.CORR_TIS_SEQ_FRAC] = torch.tensor(count_sequences(truncated, seq_ids) / n_seq, dtype=dt,
                                                      device=w.device)
        stats[M.CORR_TIS_TOKEN_FRAC] = truncated.sum().to(dt) / n
    stats[M.CORR_IS_W_MEAN] = torch.where(keep, w, zero).sum() / n
    ninf = torch.tensor(-math.inf, dtype=dt, device=w.device)
    stats[M.CORR_IS_W_MAX] = torch.where(keep, w, ninf).max() if keep.numel() else ninf
    return w, keep, stats


def _buckets(versions: torch.Tensor, current_version: int, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    d = current_version - versions
    return {"d0": mask & (d <= 0), "d1": mask & (d == 1), "d2": mask & (d == 2), "d3+": mask & (d >= 3)}


def mismatch_stats(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, versions: torch.Tensor,
                   current_version: int, mask: torch.Tensor, *, num_tokens=None) -> dict[str, torch.Tensor]:
    """k1 and k3 estimates of KL(pi_engine || pi_trainer) over the masked tokens, in fp64: overall under
    ``mismatch/k1`` / ``mismatch/k3`` and per staleness bucket (``d0``: d <= 0, ``d1``, ``d2``, ``d3+``) as
    that bucket's share under ``mismatch/<k>/<bucket>``, with the bucket's token fraction under
    ``mismatch/token_frac/<bucket>`` (means divide by ``num_tokens``, so they sum over micro-batches and
    ranks; :func:`megatron_a3po.loss.stats.finalize_bucket_means` turns shares into bucket means)."""
    m = mask.bool()
    if engine_logp.shape != m.shape or trainer_logp.shape != m.shape or versions.shape != m.shape:
        raise ValueError(f"engine_logp {tuple(engine_logp.shape)}, trainer_logp {tuple(trainer_logp.shape)} and "
                         f"versions {tuple(versions.shape)} must match the mask {tuple(m.shape)}")
    n = (m.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=m.device)).to(torch.float64).clamp(min=1)
    zero = torch.zeros((), dtype=torch.float64, device=m.device)
    lr = torch.where(m, trainer_logp.detach().to(torch.float64) - engine_logp.detach().to(torch.float64), zero)
    per_token = {M.MISMATCH_K1: -lr, M.MISMATCH_K3: torch.expm1(lr) - lr}
    buckets = _buckets(versions, current_version, m)
    out = {M.MISMATCH_BUCKET_FRAC.format(bucket=b): (bm.sum().to(torch.float64) / n).float()
           for b, bm in buckets.items()}
    for key, x in per_token.items():
        out[key] = (torch.where(m, x, zero).sum() / n).float()
        for b, bm in buckets.items():
            out[f"{key}/{b}"] = (torch.where(bm, x, zero).sum() / n).float()
    return out
