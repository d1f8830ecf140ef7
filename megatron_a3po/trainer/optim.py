"""The actor's optimizer: megatron-core's DistributedDataParallel + ``get_megatron_optimizer``.

One path on every machine: CPU (gloo) runs the same Megatron DDP grad buffers, distributed optimizer
(``parallel.use_distributed_optimizer``, on by default: each data-parallel rank keeps the fp32 main
weights and Adam moments of its 1/DP slice, reduce-scatters gradients and all-gathers the updated
weights) and mixed precision (bf16 parameters with fp32 main weights) as a GPU. The few CUDA-only calls
inside megatron.core.distributed / megatron.core.optimizer are redirected to the CPU by module-local
stand-ins (megatron_a3po.platform.cpu), applied only when there is no CUDA device.

Gradient semantics: the loss of every micro-batch is already divided by the minibatch's global token
count N (megatron_a3po.loss.pipeline), so DDP runs with ``calculate_per_token_loss=True`` (gradients
are *summed* over data-parallel ranks, not averaged) and the schedule's ``finalize_model_grads`` gets
no token count (no second division). finalize_model_grads also sums the tied embedding/output
gradients between the first and last pipeline stage. The grad norm is Megatron's (tensor-parallel
duplicates and the pipeline-shared output weight counted once), clipped at ``trainer.grad_clip``.
"""

from __future__ import annotations

import math

import torch


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


class MegatronOptimizer:
    """Megatron DDP-wrapped model chunks (``model_chunks``: what the schedule runs) and their optimizer."""

    # the distributed optimizer's checkpoint format: one ShardedTensor per parameter, a flattened piece
    # of the canonical (unsharded) state, so a checkpoint resumes at any TP/PP/DP (megatron-core 0.16-0.19).
    # Host memory at save: megatron all-gathers the DP ranks' fp32 state onto every DP rank's host first,
    # 12 B x params / (TP x PP) per rank (about 212 GB per node at 70B, docs/launch.md). The bounded
    # alternative, "fully_sharded_model_space" (each rank writes only its shard), failed the resume-at-
    # another-layout test on CPU when tried (issue 27); it is not switched on.
    SHARDING_TYPE = "fully_reshardable"

    def __init__(self, model_chunks, cfg, parallel_cfg, *, bf16: bool):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.distributed = bool(parallel_cfg.use_distributed_optimizer)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
            use_distributed_optimizer=self.distributed)
        for m in model_chunks:  # DDP reads it from the model config: SUM over DP, no 1/DP pre-scaling
            if not m.config.calculate_per_token_loss:
                raise ValueError("MegatronOptimizer needs model.config.calculate_per_token_loss=True "
                                 "(the loss is already a global token mean)")
        self.model_chunks = [DistributedDataParallel(config=m.config, ddp_config=ddp_cfg, module=m)
                             for m in model_chunks]
        ocfg = OptimizerConfig(optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay,
                               adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
                               clip_grad=float(cfg.grad_clip or 0.0), bf16=bf16,
                               params_dtype=torch.bfloat16 if bf16 else torch.float32,
                               use_distributed_optimizer=self.distributed)
        self.opt = get_megatron_optimizer(ocfg, self.model_chunks)

        # num_tokens=None: no extra token normalisation in finalize (our loss already divides by N)
        def finalize(chunks, num_tokens=None, *a, **k):
            return finalize_model_grads(chunks, None)

        for m in self.model_chunks:
            m.config.finalize_model_grads_func = finalize

    def zero_grad(self):
        for m in self.model_chunks:
            m.zero_grad_buffer()
        self.opt.zero_grad()

    def set_lr(self, lr: float):
        for g in self.opt.param_groups:
            g["lr"] = lr

    def step(self) -> float:
        """One update from the reduced gradients; returns the global grad norm (before clipping)."""
        ok, grad_norm, _ = self.opt.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped (inf/nan gradients): check the loss stats")
        norm = float(grad_norm)
        if not math.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm}: check the loss stats (the run stops here; "
                                     "the last checkpoint is intact)")
        return norm

    def sharded_state_dict(self, model_sharded_state_dict, *, is_loading: bool = False):
        """The optimizer's dist_checkpointing state dict (reshardable: see SHARDING_TYPE)."""
        if is_loading:
            self._allocate_state()
        return self.opt.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                           metadata={"distrib_optim_sharding_type": self.SHARDING_TYPE})

    def _allocate_state(self):
        """Give a fresh distributed optimizer its Adam state before a load.

        With torch's AdamW (no TE/apex fused Adam: every CPU, and GPUs without TE),
        ``DistributedOptimizer.state_dict()`` reads the per-parameter ``step`` and fails on an
        optimizer that has not stepped yet; megatron's own ``_init_optimizer_states_with_dummy_values``
        allocates it with one zero-gradient step, run here at lr 0 so no weight moves (the values are
        then overwritten by the load)."""
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        for o in getattr(self.opt, "chained_optimizers", [self.opt]):
            if isinstance(o, DistributedOptimizer) and len(o.optimizer.state) == 0:
                lrs = [g["lr"] for g in o.optimizer.param_groups]
                for g in o.optimizer.param_groups:
                    g["lr"] = 0.0
                o._init_optimizer_states_with_dummy_values()
                for g, lr in zip(o.optimizer.param_groups, lrs):
                    g["lr"] = lr

    def load_state_dict(self, sd):
        """Restore from a loaded ``sharded_state_dict`` (fp32 main weights, moments, step)."""
        self.opt.load_state_dict(sd)
        # with torch's AdamW, megatron's load gives every parameter's state the *same* ``step`` tensor;
        # AdamW increments each parameter's step in place, so a shared one would advance once per
        # parameter per update (wrong bias correction after a resume): give each its own copy
        for o in getattr(self.opt, "chained_optimizers", [self.opt]):
            for st in getattr(getattr(o, "optimizer", None), "state", {}).values():
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].clone()

    def main_state(self, name: str) -> dict[str, torch.Tensor]:
        """``{param name: this rank's slice of the Adam state ``name`` ('exp_avg', 'exp_avg_sq')}``
        (flattened; under the distributed optimizer, only the slice this DP rank owns). For tests."""
        out = {}
        for m in self.model_chunks:
            names = {id(p): n for n, p in m.module.named_parameters()}
            for opt in getattr(self.opt, "chained_optimizers", [self.opt]):
                inner = opt.optimizer
                for group in inner.param_groups:
                    for p in group["params"]:
                        st = inner.state.get(p, {})
                        if name in st:
                            key = _model_param_name(opt, p, names)
                            if key is not None:
                                out[key] = st[name].detach().clone().reshape(-1)
        return out


def _model_param_name(opt, main_param, names):
    """The model parameter name of an optimizer (main) parameter."""
    if id(main_param) in names:
        return names[id(main_param)]
    for model_groups, main_groups in _group_pairs(opt):
        for mg, sg in zip(model_groups, main_groups):
            for mp, sp in zip(mg, sg):
                if sp is main_param:
                    return names.get(id(mp))
    return None


def _group_pairs(opt):
    pairs = []
    for a, b in (("model_float16_groups", "shard_fp32_from_float16_groups"),
                 ("model_fp32_groups", "shard_fp32_groups"),
                 ("float16_groups", "fp32_from_float16_groups")):
        if hasattr(opt, a) and hasattr(opt, b):
            pairs.append((getattr(opt, a), getattr(opt, b)))
    return pairs


def build_optimizer(model_chunks, trainer_cfg, parallel_cfg, *, bf16: bool = False):
    return MegatronOptimizer(model_chunks, trainer_cfg, parallel_cfg, bf16=bf16)
