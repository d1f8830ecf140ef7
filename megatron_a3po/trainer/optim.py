"""Optimizers for the actor: Megatron's (DDP + distributed optimizer) on GPU, a plain one on CPU.

Why two: megatron-core's DDP grad buffers, ``MegatronOptimizer`` and ``clip_grad_norm_fp32`` allocate
on ``cuda`` unconditionally, so on a CPU machine the trainer uses ``torch.optim.AdamW`` with the same
semantics Megatron gives: gradients summed over data-parallel ranks (the loss is already divided by the
global token count: see megatron_a3po.loss.pipeline), tied embedding/output gradients summed between the
first and last pipeline stage, and the global gradient norm counted once per parameter shard
(tensor-parallel duplicates and the pipeline-shared output weight excluded), then clipped.

Both expose the same small interface: ``zero_grad()``, ``step() -> grad_norm``, ``set_lr(lr)``,
``state_dict()`` / ``load_state_dict()``, and ``model_chunks`` (what the schedule runs).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def lr_at(step: int, cfg) -> float:
    """The recipe's LR schedule (trainer.lr, lr_schedule, lr_warmup_steps, steps) at ``step``."""
    base = cfg.lr
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return base * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return base
    span = max(1, cfg.steps - cfg.lr_warmup_steps)
    frac = min(1.0, (step - cfg.lr_warmup_steps) / span)
    if cfg.lr_schedule == "linear":
        return base * (1.0 - frac)
    return base * 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine


class PlainOptimizer:
    """torch AdamW with Megatron's gradient semantics, for CPU (gloo) runs."""

    def __init__(self, model_chunks, cfg):
        self.model_chunks = model_chunks
        self.params = [p for m in model_chunks for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                     eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.grad_clip = cfg.grad_clip

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def set_lr(self, lr: float):
        for g in self.opt.param_groups:
            g["lr"] = lr

    def _sync_grads(self):
        from megatron.core import parallel_state as ps

        # tied word embeddings: first-stage embedding and last-stage output weight are one parameter
        if ps.get_pipeline_model_parallel_world_size() > 1 and ps.is_rank_in_embedding_group():
            grp = ps.get_embedding_group()
            if dist.get_world_size(grp) > 1:
                for m in self.model_chunks:
                    w = None
                    if hasattr(m, "shared_embedding_or_output_weight") and getattr(m, "share_embeddings_and_output_weights", False):
                        w = m.shared_embedding_or_output_weight()
                    if w is not None:
                        g = w.grad if w.grad is not None else torch.zeros_like(w)
                        dist.all_reduce(g, group=grp)
                        w.grad = g
        # data parallel: SUM (the loss is already normalised by the global token count)
        dp = ps.get_data_parallel_world_size()
        if dp > 1:
            grp = ps.get_data_parallel_group()
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=grp)

    def grad_norm(self) -> float:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        sq = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if p.grad is None or not param_is_not_shared(p) or not param_is_not_tensor_parallel_duplicate(p):
                continue
            sq += p.grad.detach().double().pow(2).sum()
        if ps.get_model_parallel_group() is not None and dist.get_world_size(ps.get_model_parallel_group()) > 1:
            dist.all_reduce(sq, group=ps.get_model_parallel_group())
        return float(sq.sqrt())

    def step(self) -> float:
        self._sync_grads()
        norm = self.grad_norm()
        if not math.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm}: refusing to step (check the loss stats)")
        if self.grad_clip and self.grad_clip > 0 and norm > self.grad_clip:
            scale = self.grad_clip / (norm + 1e-6)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.opt.step()
        return norm

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, sd):
        self.opt.load_state_dict(sd)


class MegatronOptimizer:
    """Megatron DDP + ``get_megatron_optimizer`` (distributed optimizer when configured); GPU only."""

    def __init__(self, model_chunks, cfg, parallel_cfg, *, bf16: bool):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
            calculate_per_token_loss=True)  # sum over DP: the loss is already a global token mean
        wrapped = []
        for m in model_chunks:
            wrapped.append(DistributedDataParallel(config=m.config, ddp_config=ddp_cfg, module=m))
        self.model_chunks = wrapped
        ocfg = OptimizerConfig(optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay,
                               adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
                               clip_grad=cfg.grad_clip, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                               use_distributed_optimizer=parallel_cfg.use_distributed_optimizer)
        self.opt = get_megatron_optimizer(ocfg, wrapped)
        # num_tokens=None: no extra token normalisation in finalize (our loss already divides by N)
        for m in wrapped:
            m.config.finalize_model_grads_func = lambda chunks, num_tokens=None, *a, **k: finalize_model_grads(chunks, None)

    def zero_grad(self):
        for m in self.model_chunks:
            m.zero_grad_buffer()
        self.opt.zero_grad()

    def set_lr(self, lr: float):
        for g in self.opt.param_groups:
            g["lr"] = lr

    def step(self) -> float:
        ok, grad_norm, _ = self.opt.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped (inf/nan gradients)")
        return float(grad_norm)

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, sd):
        self.opt.load_state_dict(sd)


def build_optimizer(model_chunks, trainer_cfg, parallel_cfg, *, bf16: bool = False):
    if torch.cuda.is_available():
        return MegatronOptimizer(model_chunks, trainer_cfg, parallel_cfg, bf16=bf16)
    return PlainOptimizer(model_chunks, trainer_cfg)
