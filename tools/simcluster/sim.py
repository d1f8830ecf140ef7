"""One training step of a GPU recipe, simulated rank by rank (megatron_a3po.platform.sim).

For each simulated rank of the recipe's layout (TP x PP x DP on cluster.trainer_nodes x gpus_per_node
GPUs), in this process, one after another: megatron_a3po.platform.init_distributed, the trainer's Actor
(Megatron GPTModel at the recipe's TP/PP/SP and dtype, DDP, the distributed optimizer), then the phases

  step        Actor.train_share in "metrics" mode: collate, the recompute pass, forward/backward through
              Megatron's pipeline schedule, DDP gradient reduce, optimizer step, the stats gather
  export      Actor.export_hf_weights: every HF tensor, TP shards gathered, PP stages to rank 0
  checkpoint  the model's and the optimizer's sharded state dicts (what dist_checkpointing saves)

with the GPU memory of the step measured by torch's MemTracker on the fake tensors. Each phase's
error is recorded (type and message) and the next phases still run where they can.

The batch: ``n_mb`` micro-batches per DP rank of samples that all have ``seq_len`` tokens, so every
micro-batch has one shape (the pipeline shape rule of the simulation) and ``seq_len * b`` is at most
``trainer.max_tokens_per_mb``.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

GiB = 2**30

# (recipe, list of ranks to simulate): the last pipeline stage first (rank 0 receives its objects),
# then a TP rank > 0, then global rank 0
DEFAULT_PROMPT = 160


@dataclass
class PhaseResult:
    ok: bool
    error: str = ""
    seconds: float = 0.0


@dataclass
class RankResult:
    rank: int
    coords: dict
    phases: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)


def hf_config_for(recipe):
    """The recipe's HF config without any download: its config.json when model.hf_path is a local
    directory, else launch/arch.py's KNOWN table (the published config.json values)."""
    from pathlib import Path

    from transformers import AutoConfig

    from launch.arch import KNOWN

    mp = recipe.model.hf_path
    if mp and (Path(mp) / "config.json").is_file():
        return AutoConfig.from_pretrained(mp)
    key = (recipe.cluster.arch or mp).rstrip("/").split("/")[-1].lower()
    d = dict(KNOWN[key])
    model_type = "llama" if d["architectures"][0].startswith("Llama") else "qwen2"
    d.setdefault("torch_dtype", "bfloat16")
    return AutoConfig.for_model(model_type, **d)


def layout_of(recipe):
    from megatron_a3po.platform.sim import RankSpec

    c, p = recipe.cluster, recipe.parallel
    world = c.trainer_nodes * c.gpus_per_node
    return RankSpec(rank=0, world=world, gpus_per_node=c.gpus_per_node, tp=p.tp, pp=p.pp)


def default_ranks(spec) -> list[int]:
    """Last stage TP rank 0 (DP rank 0), a TP rank > 0 of the last stage on another GPU, then rank 0."""
    last = (spec.pp - 1) * spec.tp * spec.dp
    out = [last] if last else []
    if spec.tp > 1:
        out.append(last + spec.tp - 1)
    else:
        out.append(min(spec.world - 1, spec.gpus_per_node - 1))  # another GPU of node 0 (DP peer)
    out.append(0)
    seen = []
    for r in out:
        if r not in seen:
            seen.append(r)
    return seen


def samples_for(recipe, spec, seq_len: int, n_mb: int, pad_multiple: int = 1):
    """One minibatch of every DP rank's share: ``n_mb`` micro-batches of ``b`` samples of ``seq_len``,
    packed by the trainer's packer (S padded to ``pad_multiple``)."""
    from megatron_a3po.trainer.batch import Share, TrainSample
    from megatron_a3po.trainer.packing import pack_microbatches

    tpb = recipe.trainer.max_tokens_per_mb
    b = max(1, tpb // seq_len)
    prompt = min(DEFAULT_PROMPT, seq_len - 1)
    resp = seq_len - prompt
    share = [TrainSample(prompt_ids=[11] * prompt, response_ids=[13] * resp, behave_logprobs=[-0.5] * resp,
                         versions=[3] * resp, advantage=1.0, group_id=i) for i in range(b * n_mb)]
    plans = pack_microbatches([s.length for s in share], tpb, pad_multiple=pad_multiple)
    return Share(share, plans, list(range(len(share))), len(share)), b


def _phase(res: RankResult, name: str, fn):
    t0 = time.perf_counter()
    try:
        out = fn()
        res.phases[name] = PhaseResult(True, seconds=time.perf_counter() - t0)
        return out
    except Exception as e:  # noqa: BLE001 - recorded for the report
        tb = "".join(l for l in traceback.format_tb(e.__traceback__) if "site-packages/torch/" not in l)
        res.phases[name] = PhaseResult(False, f"{type(e).__name__}: {e}"[:1500] + "\n" + tb[-5000:],
                                       time.perf_counter() - t0)
        return None


def simulate_rank(recipe, hf_config, spec, *, seq_len: int, n_mb: int, measure_memory: bool = True,
                  phases=("step", "export", "checkpoint")) -> RankResult:
    import torch

    from megatron_a3po.platform import init_distributed
    from megatron_a3po.platform import sim
    from megatron_a3po.trainer.loop import build_actor

    sim.begin_rank(spec)
    tp_r, dp_r, pp_r = spec.coords(spec.rank)
    res = RankResult(spec.rank, {"tp": tp_r, "dp": dp_r, "pp": pp_r, "local_rank": spec.local_rank(spec.rank)})
    recipe = recipe.model_copy(deep=True)
    recipe.trainer.mode = "metrics"  # the recompute pass and the loglinear approximation, both
    if "spawn" in phases and spec.local_rank(spec.rank) > 0:
        with sim.fake_mode():
            res.checks["spawn"] = _phase(res, "spawn", lambda: _spawned_rank(spec))
        sim.end_rank()
        sim.begin_rank(spec)
    try:
        with sim.fake_mode():
            ok = _phase(res, "init", lambda: init_distributed(tp=spec.tp, pp=spec.pp, seed=recipe.trainer.seed))
            if not res.phases["init"].ok:
                return res
            actor = _phase(res, "build", lambda: build_actor(recipe, hf_config))
            if actor is None:
                return res
            share, b = samples_for(recipe, spec, seq_len, n_mb, actor.pad_multiple)
            res.checks["micro_batch"] = {"b": b, "seq_len": seq_len, "n_mb": n_mb, "tokens": b * seq_len}
            if "step" in phases:
                seq_lens = res.checks.setdefault("seq_lens", [])
                packer = actor._microbatches

                def microbatches(*a, **k):  # record the padded shapes the schedule gets
                    mbs = packer(*a, **k)
                    seq_lens.extend(int(m.tokens.shape[1]) for m in mbs)
                    return mbs

                actor._microbatches = microbatches
                holder = {}
                sim.SIM_CUDA.synchronize_calls = 0
                sim.SIM_CUDA.synchronize_callers = {}

                def step():
                    if not measure_memory:
                        return actor.train_share([share], current_version=5)
                    holder["mt"] = _tracker(actor)
                    with holder["mt"]:
                        return actor.train_share([share], current_version=5)

                stats = _phase(res, "step", step)
                tracker = holder.get("mt")
                res.checks["synchronize_calls"] = sim.SIM_CUDA.synchronize_calls
                res.checks["synchronize_callers"] = dict(sim.SIM_CUDA.synchronize_callers)
                if stats is not None:
                    res.checks["stats_types"] = sorted({type(v).__name__ for v in stats.values()})
                if tracker is not None:
                    res.memory = _memory_breakdown(tracker, actor)
            if "export" in phases:
                res.checks["export"] = _phase(res, "export", lambda: _export(actor))
            if "checkpoint" in phases:
                res.checks["checkpoint"] = _phase(res, "checkpoint", lambda: _checkpoint(actor))
            ok = ok  # noqa: PLW0127
    finally:
        sim.end_rank()
        del torch
    return res


def _probe_collective(rank, world):
    import torch
    import torch.distributed as dist

    from megatron_a3po.platform import comm_device

    t = torch.zeros(1, device=comm_device())
    dist.all_reduce(t)
    return str(t.device)


def _spawned_rank(spec) -> dict:
    """A rank as megatron_a3po.platform.procs.run_distributed starts it (no torchrun), on backend nccl,
    runs one all-reduce on the communication device."""
    import queue

    from megatron_a3po.platform import procs

    q = queue.Queue()
    lr = spec.local_rank(spec.rank)  # run_distributed starts the ranks of one node: rank = local rank
    procs._entry(lr, spec.gpus_per_node, 1, "nccl", _probe_collective, (), {}, q, {}, 60.0)
    rank, ok, payload = q.get_nowait()
    if not ok:
        raise RuntimeError(payload.strip().splitlines()[-1])
    return {"device": payload}


def _export(actor) -> dict:
    n, nbytes, devices = 0, 0, set()
    for bucket in actor.export_hf_weights(512 << 20):
        for _name, t in bucket:
            n += 1
            nbytes += t.numel() * t.element_size()
            devices.add(str(t.device))
    return {"tensors": n, "bytes": nbytes, "devices": sorted(devices)}


def _checkpoint(actor) -> dict:
    """The sharded state dicts a checkpoint saves; host bytes this rank stages to write them."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    from megatron_a3po.trainer.checkpoint import _model_sharded_state_dict

    msd = _model_sharded_state_dict(actor)
    osd = actor.optim.sharded_state_dict(_model_sharded_state_dict(actor))
    out = {}
    for name, sd in (("model", msd), ("optim", osd)):
        tensors, _ = extract_sharded_tensors_and_factories(sd)
        written, devices = 0, set()
        from megatron.core.dist_checkpointing.dict_utils import nested_values

        for st in nested_values(tensors):
            if isinstance(st, ShardedTensor):
                devices.add(str(st.data.device))
                # a replica (replica_id != 0 in any coordinate) is not written by this rank
                rid = st.replica_id if isinstance(st.replica_id, tuple) else (st.replica_id,)
                if all(r == 0 for r in rid):
                    written += st.data.numel() * st.data.element_size()
            elif isinstance(st, torch.Tensor):
                devices.add(str(st.device))
        out[name] = {"host_bytes": written, "devices": sorted(devices)}
    return out


# ---------------------------------------------------------------------------------------------- memory
def _tracker(actor):
    return LiveBytes(actor)


class LiveBytes:
    """GPU memory of this rank during the step: every CUDA storage made under it is counted while alive
    (a weak reference per storage; sizes rounded up to the caching allocator's 512-byte blocks), on top of
    what exists when it starts (the model, DDP buffers and optimizer state: ``static``). ``peak`` is
    the largest total seen. (torch's MemTracker walks every module's ``buffers()``, which megatron's DDP
    shadows with a list, so it cannot follow a megatron model.)"""

    BLOCK = 512

    def __init__(self, actor):
        self.static = _static_bytes(actor)
        self.live = 0
        self.peak = 0
        self._seen = set()

    def __enter__(self):
        from megatron_a3po.platform import sim

        sim.OBSERVERS.append(self._observe)
        return self

    def _observe(self, out):
        import weakref

        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                st = t.untyped_storage()
                key = id(st)
                if key in self._seen:
                    continue
                n = -(-st.nbytes() // self.BLOCK) * self.BLOCK
                self._seen.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, n)

    def _free(self, key, n):
        self._seen.discard(key)
        self.live -= n

    def __exit__(self, *exc):
        from megatron_a3po.platform import sim

        sim.OBSERVERS.remove(self._observe)
        return False


def _static_bytes(actor) -> dict:
    """Parameters (this rank's shard, in DDP's contiguous buffer), fp32 gradient buffers, optimizer
    state (fp32 main weights and Adam moments of this DP rank's shard: allocated at the first step)."""
    params = sum(p.numel() * p.element_size() for m in actor.chunks for p in m.module.parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for m in actor.chunks for b in m.buffers)
    main = sum(p.numel() * p.element_size() for o in getattr(actor.optim.opt, "chained_optimizers", [actor.optim.opt])
               for g in o.optimizer.param_groups for p in g["params"])
    return {"params": params, "grads": grads, "main_params": main}


def _optimizer_bytes(actor) -> int:
    n = 0
    for o in getattr(actor.optim.opt, "chained_optimizers", [actor.optim.opt]):
        for g in o.optimizer.param_groups:
            for p in g["params"]:
                n += p.numel() * p.element_size()
                for v in o.optimizer.state.get(p, {}).values():
                    if hasattr(v, "numel") and v.ndim > 0:
                        n += v.numel() * v.element_size()
    return n


def _memory_breakdown(mt, actor) -> dict:
    """Bytes per GPU: static parts counted directly, the step's transient peak (activations kept for
    backward, logits, gradients of activations, the Adam state made at the first update) on top."""
    opt = _optimizer_bytes(actor)
    st = mt.static
    return {"params": st["params"], "grads": st["grads"], "optimizer": opt,
            "step_peak_over_static": mt.peak, "peak_total": st["params"] + st["grads"] + st["main_params"] + mt.peak}
