"""The A-3PO loss inside Megatron's pipeline schedule.

``get_forward_backward_func()`` calls a *forward step* on every pipeline stage with the next
micro-batch; on the last stage the returned ``loss_func`` receives this rank's vocab-sharded logits
[b, S, Vp/TP]. Here it computes log-probs and entropy with the vocab-parallel kernel (no full-vocab
gather) and the decoupled PPO loss.

Scaling. The loss of a minibatch is ``sum(mask * l) / N`` with N the masked-token count of the whole
minibatch across micro-batches and data-parallel ranks (docs/algorithm.md, "The token mean"). Each micro-batch's loss_func
therefore returns its *partial sum divided by the global N*, as a 3-tuple ``(loss, num_tokens, stats)``
and the model config must have ``calculate_per_token_loss=True`` so the schedule neither divides by the
micro-batch count nor by the token count; data-parallel gradients must then be *summed*, not averaged
(DDP with ``calculate_per_token_loss=True``, or the plain CPU path's all-reduce SUM). The result does
not depend on how the minibatch is split into micro-batches. The other aggregations (loss/aggregate.py)
divide by global counts too: ``num_seqs_global`` (sequences of the whole minibatch) is to sequences
what ``num_tokens_global`` is to tokens.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_a3po.ops import vocab_parallel_logprobs_entropy


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def _forward(model, mb):
    return model(mb.tokens, mb.position_ids, None)


def _forward_step(loss_func):
    """The schedule's forward step: next micro-batch through the model chunk, then ``loss_func(mb, out)``."""

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        return _forward(model, mb), partial(loss_func, mb)

    return forward_step


def sequence_ids(mb, mask: torch.Tensor) -> torch.Tensor:
    """Per-position sequence ids of a micro-batch: its ``seq_ids`` if it carries them (packed rows),
    else one sequence per row (``trainer.batch.collate``)."""
    from megatron_a3po.loss.aggregate import default_seq_ids

    ids = getattr(mb, "seq_ids", None)
    return default_seq_ids(mask) if ids is None else ids.to(mask.device)


def policy_forward_step(*, mode: str, current_version: int, num_tokens_global: int, temperature: float,
                        vocab_size: int, loss_kwargs: dict | None = None, alpha_schedule: str = "inverse",
                        entropy_coef: float = 0.0, prox_timer=None,
                        schedule_kwargs: dict | None = None, num_seqs_global: int | None = None,
                        agg_mode: str = "token-mean", agg_norm_constant: float | None = None,
                        mismatch_metrics: bool = False, prox_hook=None):
    """Forward step for one PPO minibatch. ``mode``: coupled | loglinear | linear | recompute | metrics.

    In recompute/metrics mode every micro-batch must carry ``prox_logp`` from ``logprob_forward_step``;
    with ``loss_kwargs["kl_coef"]`` > 0, every micro-batch must carry ``ref_logp`` (the reference pass).
    ``prox_timer`` (a megatron_a3po.platform.gpu.IntervalTimer) adds up the time spent forming the proximal
    log-probs, with device events: no synchronisation per micro-batch.
    ``schedule_kwargs`` (alpha_slope, alpha_cap, alpha_fixed) go to the alpha schedule with ``alpha_schedule``.
    ``agg_mode`` / ``agg_norm_constant``: the loss aggregation (loss/aggregate.py), over
    ``num_seqs_global`` sequences (default: each micro-batch's own count, right only for one micro-batch).
    ``mismatch_metrics``: log loss/correction.py's mismatch_stats between the engine's log-probs and the
    trainer's (the recomputed proximal ones in recompute/metrics mode, else the trained policy's).
    ``prox_hook(mb, prox, logp)`` (the audit, trainer/audit.py) sees every micro-batch's proximal and
    current log-probs (detached) and returns the proximal log-probs to train with (its recompute fallback).
    """
    from megatron_a3po.loss import approx_error_stats, approximate_prox_logp, decoupled_ppo_loss, staleness_stats
    from megatron_a3po.loss.aggregate import count_sequences, token_scale
    from megatron_a3po.loss.correction import mismatch_stats

    if mode not in ("coupled", "loglinear", "linear", "recompute", "metrics"):
        raise ValueError(f"trainer.mode: unknown mode {mode!r}")
    loss_kwargs = dict(loss_kwargs or {})
    sk = dict(schedule_kwargs or {})
    tp_group = _tp_group()
    corr = loss_kwargs.get("correction")
    needs_seq = (agg_mode != "token-mean" or loss_kwargs.get("pg_variant", "ppo") == "gspo"
                 or (corr is not None and corr.active))
    wants_ref = bool(loss_kwargs.get("kl_coef"))

    def loss_func(mb, logits):
        logp, ent = vocab_parallel_logprobs_entropy(logits, mb.labels, tp_group=tp_group,
                                                    temperature=temperature, vocab_size=vocab_size)
        mask = mb.loss_mask.to(logp.device)
        behave = mb.behave_logp.to(logp.device)
        versions = mb.versions.to(logp.device)
        if prox_timer is not None:
            prox_timer.start()
        if mode == "coupled":
            prox = behave
        elif mode in ("recompute", "metrics"):
            if mb.prox_logp is None:
                raise RuntimeError(f"trainer.mode={mode}: micro-batch has no recomputed prox_logp")
            prox = mb.prox_logp.to(logp.device)
        else:
            prox = approximate_prox_logp(behave, logp.detach(), versions, current_version, method=mode,
                                         alpha_schedule=alpha_schedule, **sk)
        if prox_timer is not None:
            prox_timer.stop()
        if prox_hook is not None:
            prox = prox_hook(mb, prox, logp.detach())
        opts, scale = {}, None
        if needs_seq:
            seq_ids = sequence_ids(mb, mask)
            n_seq = count_sequences(mask, seq_ids) if num_seqs_global is None else num_seqs_global
            opts.update(seq_ids=seq_ids, num_seqs=n_seq)
            scale = token_scale(mask, seq_ids, agg_mode, num_seqs=n_seq, norm_constant=agg_norm_constant)
            if scale is not None:
                opts["token_scale"] = scale
        if wants_ref:
            if getattr(mb, "ref_logp", None) is None:
                raise RuntimeError("loss.kl_coef > 0: micro-batch has no reference log-probs (ref_logp)")
            opts["ref_logp"] = mb.ref_logp.to(logp.device)
        loss, stats = decoupled_ppo_loss(logp, behave, prox, mb.advantages.to(logp.device), mask,
                                         num_tokens=num_tokens_global, entropy=ent.detach(), **loss_kwargs, **opts)
        stats = dict(stats)
        stats.update(staleness_stats(versions, current_version, mask, alpha_schedule=alpha_schedule,
                                     num_tokens=num_tokens_global, **sk))
        if entropy_coef:   # the entropy bonus, aggregated like the policy loss
            if scale is None:
                loss = loss - entropy_coef * (ent * mask).sum() / num_tokens_global
            else:
                loss = loss - entropy_coef * (ent * mask * scale).sum()
        if mismatch_metrics:
            trainer_lp = prox if mode in ("recompute", "metrics") else logp.detach()
            stats.update(mismatch_stats(behave, trainer_lp, versions, current_version, mask,
                                        num_tokens=num_tokens_global))
        if mode == "metrics":
            stats.update(approx_error_stats(prox, behave, logp.detach(), versions, current_version, mask,
                                            alpha_schedule=alpha_schedule, num_tokens=num_tokens_global, **sk))
        stats["_loss"] = loss.detach()  # this micro-batch's share of the minibatch loss
        return loss, mask.sum().to(torch.int), stats

    return _forward_step(loss_func)


def logprob_forward_step(*, temperature: float, vocab_size: int):
    """Forward-only step returning the masked token log-probs of each micro-batch (recompute pass)."""
    tp_group = _tp_group()

    def loss_func(mb, logits):
        with torch.no_grad():
            logp, _ = vocab_parallel_logprobs_entropy(logits, mb.labels, tp_group=tp_group,
                                                      temperature=temperature, vocab_size=vocab_size)
        return torch.zeros((), device=logits.device), {"logp": logp.float().cpu()}

    return _forward_step(loss_func)


def sft_forward_step(*, num_tokens_global: int, vocab_size: int):
    """Next-token cross-entropy on the masked (response) tokens: the optional supervised warm start."""
    tp_group = _tp_group()

    def loss_func(mb, logits):
        logp, _ = vocab_parallel_logprobs_entropy(logits, mb.labels, tp_group=tp_group, vocab_size=vocab_size)
        mask = mb.loss_mask.to(logp.device)
        nll = -(logp * mask).sum()
        return nll / num_tokens_global, mask.sum().to(torch.int), {"_nll_sum": nll.detach()}

    return _forward_step(loss_func)
