"""How loss statistics are combined across micro-batches and data-parallel ranks.

Every stat returned by :mod:`megatron_a3po.loss` is a detached tensor that is one of:

* ``sum``: a count, a histogram, or a "mean" that was already divided by the GLOBAL masked-token count
  ``num_tokens`` (all micro-batches, all DP ranks). Summing the micro-batch values gives the minibatch mean.
* ``max`` / ``min``: extrema; an empty micro-batch reports -inf / +inf (the identity of the reduction).

So the minibatch value of a stat is ``reduce(op, [micro-batch values])`` with op from :func:`stat_reduction`,
first over micro-batches (:func:`aggregate_stats`), then over DP ranks (:func:`all_reduce_stats`).
Means are exact only when every micro-batch was called with the same global ``num_tokens``.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.distributed as dist

from megatron_a3po import metrics as M

__all__ = ["STAT_REDUCTIONS", "stat_reduction", "aggregate_stats", "all_reduce_stats", "finalize_bucket_means"]

STAT_REDUCTIONS: dict[str, str] = {
    M.PG_LOSS: "sum", M.ENTROPY: "sum", M.APPROX_KL: "sum", M.NUM_TOKENS: "sum",
    M.RATIO_MAX: "max", M.RATIO_MIN: "min", M.RATIO_MEAN: "sum",
    M.BEHAVE_W_MAX: "max", M.BEHAVE_W_MEAN: "sum",
    M.BEHAVE_W_CAPPED: "sum", M.BEHAVE_W_CAPPED_FRAC: "sum",
    M.CLIP_COUNT: "sum", M.CLIP_FRAC: "sum", M.DUAL_CLIP_COUNT: "sum",
    M.ALPHA_MEAN: "sum", M.STALENESS_MEAN: "sum", M.STALENESS_MAX: "max", M.STALENESS_HIST: "sum",
    M.CORR_TIS_TOKEN_FRAC: "sum", M.CORR_TIS_SEQ_FRAC: "sum", M.CORR_MIS_TOKEN_FRAC: "sum",
    M.CORR_MIS_SEQ_FRAC: "sum", M.CORR_IS_W_MEAN: "sum", M.CORR_IS_W_MAX: "max", M.KL_REF: "sum",
}
_ERR_PREFIX = M.APPROX_ERR_ABS.split("{")[0]  # "approx_err/": per-method error means, all "sum"
_MISMATCH_PREFIX = "mismatch/"                 # mismatch means and bucket shares, all "sum"
# families of per-staleness-bucket shares: (key prefix, bucket-fraction key, bucket names)
_BUCKET_FAMILIES = ((_ERR_PREFIX, M.APPROX_ERR_BUCKET_FRAC, M.APPROX_ERR_BUCKETS),
                    (_MISMATCH_PREFIX, M.MISMATCH_BUCKET_FRAC, M.MISMATCH_BUCKETS))


def stat_reduction(key: str) -> str:
    """The reduction ("sum", "max" or "min") that combines micro-batch / rank values of stat ``key``."""
    if key in STAT_REDUCTIONS:
        return STAT_REDUCTIONS[key]
    if key.startswith(_ERR_PREFIX) or key.startswith(_MISMATCH_PREFIX):
        return "sum"
    raise ValueError(f"unknown stat key {key!r}: add it to STAT_REDUCTIONS")


def aggregate_stats(stats_list: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Combine the stats dicts of several micro-batches into one (sum / max / min per key)."""
    out: dict[str, torch.Tensor] = {}
    for stats in stats_list:
        for key, val in stats.items():
            val = val.detach()
            if key not in out:
                out[key] = val.clone()
                continue
            op = stat_reduction(key)
            out[key] = out[key] + val if op == "sum" else (
                torch.maximum(out[key], val) if op == "max" else torch.minimum(out[key], val))
    return out


_DIST_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_stats(stats: Mapping[str, torch.Tensor], group=None) -> dict[str, torch.Tensor]:
    """All-reduce aggregated stats over ``group`` (the data-parallel group); one collective per key.

    Every rank must hold the same keys (sorted order is used so the collectives match).
    """
    out = {}
    for key in sorted(stats):
        t = stats[key].detach().clone()
        dist.all_reduce(t, op=_DIST_OPS[stat_reduction(key)], group=group)
        out[key] = t
    return out


def finalize_bucket_means(stats: Mapping[str, float]) -> dict[str, float]:
    """Turn per-staleness-bucket shares (metrics mode's ``approx_err/<method>/<name>/<bucket>`` and the
    mismatch metrics' ``mismatch/<k>/<bucket>``, each a bucket's sum divided by the overall token count)
    into that bucket's own mean: share / the bucket's token fraction. Buckets without tokens are left out.
    Call it once, on the combined (micro-batch, rank, minibatch) stats."""
    out = dict(stats)
    for prefix, frac_key, buckets in _BUCKET_FAMILIES:
        frac_prefix = frac_key.split("{")[0]
        for key, val in stats.items():
            if not key.startswith(prefix) or key.startswith(frac_prefix):
                continue
            bucket = key.rsplit("/", 1)[-1]
            if bucket not in buckets:
                continue
            frac = float(stats.get(frac_key.format(bucket=bucket), 0.0))
            if frac > 0:
                out[key] = float(val) / frac
            else:
                del out[key]
    return out
