"""The A-3PO loss: staleness-interpolated proximal log-probs and the decoupled PPO objective.

See docs/algorithm.md. ``approximate_prox_logp`` -> ``decoupled_ppo_loss`` per micro-batch; stats combine with
``aggregate_stats`` (micro-batches) and ``all_reduce_stats`` (data-parallel ranks).
"""

from megatron_a3po.loss.ppo import decoupled_ppo_loss
from megatron_a3po.loss.prox import (ALPHA_SCHEDULES, APPROX_METHODS, PROX_METHODS, V_PROX_OFFSET,
                                     approx_error_stats, approximate_prox_logp, check_prox_logp,
                                     shift_to_positions, staleness_alpha, staleness_stats)
from megatron_a3po.loss.stats import (STAT_REDUCTIONS, aggregate_stats, all_reduce_stats, finalize_bucket_means,
                                     stat_reduction)

__all__ = [
    "decoupled_ppo_loss", "approximate_prox_logp", "staleness_alpha", "check_prox_logp", "staleness_stats",
    "approx_error_stats", "shift_to_positions", "aggregate_stats", "all_reduce_stats", "stat_reduction",
    "finalize_bucket_means",
    "STAT_REDUCTIONS", "V_PROX_OFFSET", "APPROX_METHODS", "PROX_METHODS", "ALPHA_SCHEDULES",
]
