"""The actor: a Megatron GPTModel (any TP/PP) that trains on rollout samples with the A-3PO loss.

One training step (``train_step``) takes a batch of samples and the trainer's policy version V, then
  1. in recompute/metrics mode, runs one forward-only pass with the weights at the start of the step
     to get the proximal log-probs (frozen for all minibatches);
  2. splits the batch into ``ppo_n_minibatches`` minibatches (whole prompt groups), packs each
     minibatch's samples into micro-batches under ``max_tokens_per_mb`` and deals them to the
     data-parallel ranks (packing.plan_minibatch, batch.dp_split), runs Megatron's pipeline schedule
     with the loss of megatron_a3po.loss.pipeline, then one optimizer update per minibatch (the
     gradients of the DP shares are summed by Megatron's DDP; the loss is the global token mean).
Every mode runs the same code; only the proximal log-probs differ, so mode comparisons are fair.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from megatron_a3po import metrics as M
from megatron_a3po.config import LossCfg, ParallelCfg, TrainerCfg
from megatron_a3po.platform import comm_device, device, synchronize, to_host
from megatron_a3po.platform.gpu import IntervalTimer
from megatron_a3po.trainer.batch import MicroBatch, Share, TrainSample, collate, dp_split
from megatron_a3po.trainer.optim import build_optimizer, lr_at

log = logging.getLogger("megatron_a3po.trainer.actor")


def combine_minibatches(mbs_stats: list[dict]) -> dict:
    """One step's value of each stat over its minibatch updates: counts and histograms add up,
    extrema take the extreme, token means average over the minibatches."""
    from megatron_a3po.loss import stat_reduction

    out = {}
    if not mbs_stats:
        return out
    for key in mbs_stats[0]:
        vals = [s[key] for s in mbs_stats]
        op = stat_reduction(key)
        if op == "max":
            v = torch.stack([x.double() for x in vals]).amax(0)
        elif op == "min":
            v = torch.stack([x.double() for x in vals]).amin(0)
        elif "count" in key or key in (M.STALENESS_HIST, M.NUM_TOKENS):
            v = torch.stack([x.double() for x in vals]).sum(0)
        else:
            v = torch.stack([x.double() for x in vals]).mean(0)
        out[key] = v.tolist() if v.ndim else float(v)
    return out


def _ps():
    from megatron.core import parallel_state as ps

    return ps


class Actor:
    """Takes its own sections only (``trainer.loop.build_actor`` hands them out of a recipe): ``trainer``
    (mode, lr schedule, minibatches, micro-batch tokens, optimizer), ``loss``, ``parallel``, the model's
    ``params_dtype``, and the rollout's sampling ``temperature`` (log-probs are of the tempered policy
    the engines sample from)."""

    def __init__(self, hf_config, *, trainer: TrainerCfg, loss: LossCfg, parallel: ParallelCfg,
                 params_dtype: str = "float32", temperature: float = 1.0, hf_dir: str | None = None,
                 mcore_dir: str | None = None, auditor=None):
        from megatron_a3po.models import build_model

        self.tc, self.lc, self.temperature = trainer, loss, temperature
        self.hf_config = hf_config
        self.vocab_size = int(hf_config.vocab_size)
        dtype = torch.bfloat16 if params_dtype == "bfloat16" else torch.float32
        self.dtype = dtype
        # sequence parallelism splits S over the TP ranks: every micro-batch's S is padded to a multiple of TP
        self.sequence_parallel = bool(parallel.sequence_parallel and parallel.tp > 1)
        self.pad_multiple = parallel.tp if self.sequence_parallel else 1
        # every parameter is loaded below (both loaders fail on a missing one): skip the random init
        model = build_model(hf_config, params_dtype=dtype, init_weights=hf_dir is None and mcore_dir is None,
                            sequence_parallel=self.sequence_parallel)
        cfg = model.config
        # see megatron_a3po.loss.pipeline: each micro-batch returns its share of the global token mean
        cfg.calculate_per_token_loss = True
        cfg.variable_seq_lengths = True  # micro-batches differ in [b, S]; PP exchanges shapes first
        if getattr(cfg, "pipeline_dtype", None) is None:
            cfg.pipeline_dtype = dtype
        if hf_dir is not None:
            from megatron_a3po.convert import load_hf_into_model

            load_hf_into_model([model], hf_dir, hf_config)
        elif mcore_dir is not None:
            from megatron_a3po.convert import load_mcore_checkpoint

            load_mcore_checkpoint([model], mcore_dir)
        self.optim = build_optimizer([model], trainer, parallel, bf16=dtype == torch.bfloat16)
        self.chunks = self.optim.model_chunks
        self.step_count = 0
        # loss.kl_coef > 0: the reference policy (trainer/reference.py), the weights the first RL step of
        # this process starts from (after the optional warm start), taken then
        self.reference = None
        self.auditor = auditor  # trainer/audit.py (None: no audit, no drift signals)

    # ------------------------------------------------------------------ helpers
    def _schedule(self, forward_step, mbs: list[MicroBatch], forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not mbs:
            return []
        fb = get_forward_backward_func()
        return fb(forward_step_func=forward_step, data_iterator=iter(mbs), model=self.chunks,
                  num_microbatches=len(mbs), seq_length=max(m.tokens.shape[1] for m in mbs),
                  micro_batch_size=max(m.tokens.shape[0] for m in mbs), forward_only=forward_only)

    def _microbatches(self, share: Share) -> list[MicroBatch]:
        dev = device()  # the model's: the schedule hands micro-batches to it as they are
        return [collate(share.samples, p.indices, p.seq_len, device=dev) for p in share.plans]

    def _split(self, groups: list[list[TrainSample]], n_minibatches: int) -> list[Share]:
        """This DP rank's shares of a batch given whole on every rank (``dp_split``)."""
        ps = _ps()
        per_dp = dp_split(groups, [[s.length for s in g] for g in groups], n_minibatches,
                          ps.get_data_parallel_world_size(), self.tc.max_tokens_per_mb, self.pad_multiple)
        return per_dp[ps.get_data_parallel_rank()]

    def _global_tokens(self, mbs) -> int:
        return self._global_counts(mbs)[0]

    def _global_counts(self, mbs) -> tuple[int, int]:
        """Masked tokens and sequences of the whole minibatch (all micro-batches, all DP ranks); counted on
        the host (collate), reduced on the communication device."""
        n = torch.tensor([float(sum(m.num_tokens for m in mbs)), float(sum(m.num_seqs for m in mbs))],
                         dtype=torch.float64, device=comm_device())
        ps = _ps()
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(n, group=ps.get_data_parallel_group())
        return int(n[0].item()), int(n[1].item())

    def _is_logging_rank(self) -> bool:
        ps = _ps()
        return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0

    def _gather_to_rank0(self, obj):
        """Collect a per-rank object from the last-stage, TP-rank-0 ranks (every DP rank) on global rank 0.
        Tensors travel as host numbers (platform.to_host): a pickled CUDA tensor would unpickle on the
        sender's GPU number here."""
        obj = to_host(obj)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, (self._is_logging_rank(), obj))
        return [o for flag, o in out if flag]

    # ------------------------------------------------------------------ passes
    def recompute_logprobs(self, mbs: list[MicroBatch], attr: str = "prox_logp") -> None:
        """Forward-only pass with the current weights: sets ``mb.<attr>`` (default ``prox_logp``) on the
        last stage."""
        from megatron_a3po.loss.pipeline import logprob_forward_step

        fwd = logprob_forward_step(temperature=self.temperature, vocab_size=self.vocab_size)
        for m in self.chunks:
            m.eval()
        with torch.no_grad():
            out = self._schedule(fwd, mbs, forward_only=True)
        for m in self.chunks:
            m.train()
        if _ps().is_pipeline_last_stage():
            for mb, o in zip(mbs, out):
                setattr(mb, attr, o["logp"])

    def train_step(self, samples: list[TrainSample], current_version: int, group_size: int) -> dict:
        """One PPO step on a whole batch, given on every rank (benchmarks and tests; the trainer deals the
        groups from rank 0, trainer/loop.py): each DP rank trains on its share (``dp_split``)."""
        if len(samples) % group_size:
            raise ValueError(f"{len(samples)} samples is not a whole number of groups of {group_size}")
        groups = [samples[i:i + group_size] for i in range(0, len(samples), group_size)]
        return self.train_share(self._split(groups, self.tc.ppo_n_minibatches), current_version)

    def train_share(self, shares: list[Share], current_version: int) -> dict:
        """One PPO step (one optimizer update per entry of ``shares``: this DP rank's samples of each
        minibatch); returns the logged stats of the whole batch on global rank 0 ({} elsewhere)."""
        from megatron_a3po.loss import aggregate_stats
        from megatron_a3po.loss.pipeline import policy_forward_step

        tc, lc = self.tc, self.lc
        mode = tc.mode
        t_step = time.perf_counter()
        minibatches = [self._microbatches(share) for share in shares]
        times = defaultdict(float)
        prox_timer = IntervalTimer()  # the loss's proximal step, timed with device events
        t_recompute = 0.0
        audit = self.auditor.begin(self, shares, minibatches, current_version, prox_timer) if self.auditor else None
        if audit is not None:
            mode = audit.mode  # "recompute" while the audit's whole-step fallback lasts
        if mode in ("recompute", "metrics"):
            synchronize()  # the recompute pass, timed whole: two synchronisations per step
            t0 = time.perf_counter()
            for mbs in minibatches:
                self.recompute_logprobs(mbs)
            synchronize()
            t_recompute = time.perf_counter() - t0
        ref_s, kl_penalty = self._reference_pass(shares, minibatches)
        loss_kwargs = dict(eps_clip=lc.eps_clip, eps_clip_high=lc.eps_clip_high, dual_clip=lc.dual_clip,
                           behave_weight_cap=lc.behave_weight_cap, behave_weight_cap_mode=lc.behave_weight_cap_mode,
                           **self._option_kwargs())
        self.set_lr(lr_at(self.step_count, tc))
        per_minibatch, grad_norms = [], []
        for mbs in minibatches:
            n_global, n_seqs = self._global_counts(mbs)
            if n_global == 0:
                continue
            fwd = policy_forward_step(mode=mode, current_version=current_version, num_tokens_global=n_global,
                                      temperature=self.temperature, vocab_size=self.vocab_size,
                                      loss_kwargs=loss_kwargs, alpha_schedule=lc.alpha_schedule,
                                      schedule_kwargs=lc.alpha_kwargs(),
                                      entropy_coef=lc.entropy_coef, prox_timer=prox_timer,
                                      num_seqs_global=n_seqs, agg_mode=lc.agg_mode,
                                      agg_norm_constant=lc.agg_norm_constant, mismatch_metrics=lc.mismatch_metrics,
                                      prox_hook=audit.hook if audit is not None else None)
            self.optim.zero_grad()
            t0 = time.perf_counter()
            out = self._schedule(fwd, mbs, forward_only=False)
            times["fwd_bwd"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            grad_norms.append(self.optim.step())
            times["opt"] += time.perf_counter() - t0
            if out:  # last pipeline stage: combine its micro-batches (means are pre-divided by n_global)
                per_minibatch.append(aggregate_stats({k: v for k, v in o.items() if not k.startswith("_")}
                                                     for o in out))
        self.step_count += 1
        n_tok = float(sum(s.length for share in shares for s in share.samples))
        t_prox = t_recompute + prox_timer.seconds
        gathered = self._gather_to_rank0((per_minibatch, t_prox, n_tok, kl_penalty,
                                          audit.partials() if audit is not None else None))
        if dist.is_initialized() and dist.get_rank() != 0:
            if audit is not None:
                audit.finish(None)  # the audit's decision reaches every rank
            return {}
        # data-parallel ranks hold disjoint token shares of each minibatch: combine them per minibatch
        n_mb = len(gathered[0][0])
        mbs_stats = [aggregate_stats({key: torch.tensor(v, dtype=torch.float64) for key, v in g[0][k].items()}
                                     for g in gathered) for k in range(n_mb)]
        stats = combine_minibatches(mbs_stats)
        stats[M.GRAD_NORM] = max(grad_norms) if grad_norms else 0.0
        # recompute: the forward pass (timed on every rank, same wall time); approximations: last stage
        stats[M.TIME_PROX] = t_prox if mode in ("recompute", "metrics") else max(g[1] for g in gathered)
        stats[M.TIME_FWD_BWD] = times["fwd_bwd"]
        stats[M.TIME_OPT] = times["opt"]
        stats["time/train"] = time.perf_counter() - t_step
        stats["_tokens_trained"] = sum(g[2] for g in gathered)  # private: the trainer logs tokens per second
        if self.reference is not None:
            stats[M.TIME_REF] = ref_s
            pens = [g[3] for g in gathered if g[3] is not None]
            if pens:  # KL in the reward: each rank's value is its minibatches' mean over all their samples
                stats[M.KL_REF_REWARD_PENALTY] = sum(pens) / len(pens)
        if audit is not None:
            stats.update(audit.finish([g[4] for g in gathered]))
        return stats

    def _option_kwargs(self) -> dict:
        """decoupled_ppo_loss's optional terms from the loss section (each off by default)."""
        from megatron_a3po.loss.correction import Correction

        lc = self.lc
        out = {}
        if lc.pg_variant != "ppo":
            out["pg_variant"] = lc.pg_variant
        corr = Correction(**lc.correction_kwargs())
        if corr.active:
            out["correction"] = corr
        if lc.kl_coef > 0 and lc.kl_in == "loss":
            out.update(kl_coef=lc.kl_coef, kl_estimator=lc.kl_estimator)
        return out

    def _reference_pass(self, shares, minibatches) -> tuple[float, float | None]:
        """With a KL term: the reference policy's log-probs into every micro-batch (``mb.ref_logp``), and
        with the KL in the reward, the penalised advantages. Returns the pass's seconds (every rank, the
        same wall time) and the mean reward penalty (None: KL in the loss, or not the last stage)."""
        lc = self.lc
        if lc.kl_coef <= 0 and self.reference is None:
            return 0.0, None
        if self.reference is None:
            from megatron_a3po.trainer.reference import ReferencePolicy

            if self.step_count:
                log.warning("loss.kl_coef: the reference policy is the weights at step %d, where this process "
                            "started (a resumed run regularises towards the weights it resumed from)",
                            self.step_count)
            self.reference = ReferencePolicy(self.chunks, lc.kl_ref_placement)
        synchronize()
        t0 = time.perf_counter()
        with self.reference.swapped_in():
            for mbs in minibatches:
                self.recompute_logprobs(mbs, attr="ref_logp")
        synchronize()
        seconds = time.perf_counter() - t0
        if lc.kl_in != "reward" or not _ps().is_pipeline_last_stage():
            return seconds, None
        from megatron_a3po.trainer.reference import penalise_advantages

        dp_group = _ps().get_data_parallel_group()
        pen = [penalise_advantages(mbs, share, coef=lc.kl_coef, estimator=lc.kl_estimator, adv_norm=lc.adv_norm,
                                   adv_eps=lc.adv_eps, group=dp_group) for share, mbs in zip(shares, minibatches)]
        return seconds, (sum(pen) / len(pen) if pen else 0.0)

    def sft_step(self, samples: list[TrainSample]) -> float:
        """One supervised step on the response tokens (warm start); returns the mean NLL."""
        from megatron_a3po.loss.pipeline import sft_forward_step

        mbs = self._microbatches(self._split([[s] for s in samples], 1)[0])
        n = self._global_tokens(mbs)
        self.set_lr(self.tc.warm_start_lr)
        self.optim.zero_grad()
        out = self._schedule(sft_forward_step(num_tokens_global=n, vocab_size=self.vocab_size), mbs, False)
        self.optim.step()
        nll = sum(float(o["_nll_sum"]) for o in out)
        g = self._gather_to_rank0(nll)
        return sum(g) / max(n, 1)

    def set_lr(self, lr: float):
        self.optim.set_lr(lr)

    # ------------------------------------------------------------------ weights
    def save_hf(self, out_dir, tokenizer_dir=None, *, fsync: bool = True):
        """Write the current weights as an HF checkpoint (collective; rank 0 writes, atomically)."""
        from megatron_a3po.convert import save_hf_checkpoint

        save_hf_checkpoint(self._bare_chunks(), self.hf_config, out_dir, tokenizer_dir=tokenizer_dir, fsync=fsync)

    def export_hf_weights(self, bucket_bytes: int):
        from megatron_a3po.convert import export_hf_weights

        return export_hf_weights(self._bare_chunks(), self.hf_config, bucket_bytes)

    def _bare_chunks(self):
        return [getattr(m, "module", m) for m in self.chunks]
