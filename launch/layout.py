"""Cluster-aware layout checks and the placement plan, computed before anything is written or submitted.

``plan_layout(recipe, executor)`` returns where every process goes (trainer ranks, one SGLang server per
engine with its node, GPUs and port, the router) or raises ``LayoutError`` listing every problem, each
naming the knob to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launch.arch import GPU_MEMORY_GB, Arch, ArchError, memory_estimate, resolve_arch
from megatron_a3po.models import LayoutError, layout_errors  # LayoutError: launch's errors too


# a rule of both executors (the others are each one executor's, or models/layout.py's)
CPU_ENGINE_TP = "rollout.engine_tp={et}: the CPU engine has no tensor parallelism; set 1"


@dataclass(frozen=True)
class EngineSlot:
    index: int  # engine number in the fleet
    node: int  # rollout node (0-based within the rollout group; always 0 for local launches)
    base_gpu: int  # first GPU of this engine on that node (--base-gpu-id), -1 on CPU
    port: int


@dataclass
class Layout:
    executor: str
    arch: Arch
    trainer_nodes: int
    trainer_procs_per_node: int
    tp: int
    pp: int
    dp: int
    engine_tp: int
    engines: list[EngineSlot] = field(default_factory=list)
    rollout_nodes: int = 0
    router_port: int | None = None
    gpu: bool = True
    memory: str | None = None


def plan_layout(recipe, executor: str, *, local_gpus: int | None = None) -> Layout:
    """Check the recipe's layout for ``executor`` ("slurm" or "local") and place every process.

    ``local_gpus``: GPUs on this machine (local executor); None = ask torch.
    """
    errors: list[str] = []
    par, ro, tr = recipe.parallel, recipe.rollout, recipe.trainer
    try:
        arch = resolve_arch(recipe)
    except ArchError as e:
        raise LayoutError(str(e)) from None
    tp, pp = par.tp, par.pp

    # --- model shape vs parallelism: the one validator (megatron_a3po.models.layout)
    errors += layout_errors(arch, tp=tp, pp=pp, engine_tp=ro.engine_tp)
    if executor == "slurm":
        pl = _slurm_placement(recipe, errors)
    elif executor == "local":
        pl = _local_placement(recipe, local_gpus, errors)
    else:
        raise LayoutError(f"--executor {executor!r}: expected local or slurm")

    # --- batch: every data-parallel rank needs sequences in every PPO minibatch
    errors += layout_errors(arch, tp=1, pp=1, dp=pl["dp"], batch_seqs=ro.batch_prompts * ro.n_samples,
                            n_minibatches=tr.ppo_n_minibatches)

    mem = None
    if arch.vocab_size and pl["gpu"]:
        est = memory_estimate(arch, tp, pp, pl["dp"], tr.max_tokens_per_mb)
        mem = est.describe()
        if est.total_gb > GPU_MEMORY_GB:
            errors.append(f"the trainer needs {mem} per GPU: {est.total_gb - GPU_MEMORY_GB:.1f} GB more than the "
                          f"{GPU_MEMORY_GB:.0f} GB of a GPU; raise parallel.tp / parallel.pp, turn on "
                          "parallel.sequence_parallel or lower trainer.max_tokens_per_mb")
    if errors:
        raise LayoutError("invalid launch layout for recipe {!r} ({} executor):\n  - {}".format(
            recipe.name, executor, "\n  - ".join(errors)))
    return Layout(executor, arch, recipe.cluster.trainer_nodes if executor == "slurm" else 1, tp=tp, pp=pp,
                  engine_tp=ro.engine_tp, memory=mem, **pl)


def _dp_of(world: int, tp: int, pp: int) -> int:
    return max(world // (tp * pp), 1)


def _slurm_placement(recipe, errors: list[str]) -> dict:
    """A heterogeneous Slurm job: trainer nodes, then rollout nodes (GPU nodes, or CPU nodes with one
    trainer rank and one CPU engine each); returns the ``Layout`` fields it places, appends what is wrong
    to ``errors``."""
    c, par, ro = recipe.cluster, recipe.parallel, recipe.rollout
    tp, pp = par.tp, par.pp
    g = c.gpus_per_node
    cpu = g == 0  # CPU nodes: one trainer rank and one CPU engine per node, no container needed
    slots = max(g, 1)
    world = c.trainer_nodes * slots
    if tp > slots and not cpu:
        errors.append(f"parallel.tp={tp} exceeds cluster.gpus_per_node={g}: tensor parallelism must "
                      "stay inside a node")
    if world % (tp * pp) != 0:
        what = (f"cluster.trainer_nodes = {world} (one rank per CPU node)" if cpu else
                f"cluster.trainer_nodes x cluster.gpus_per_node = {c.trainer_nodes} x {g} = {world}")
        errors.append(f"trainer {'ranks' if cpu else 'GPUs'} = {what} is not a multiple of parallel.tp x "
                      f"parallel.pp = {tp} x {pp} = {tp * pp} (trainer ranks = TP x PP x DP)")
    dp = _dp_of(world, tp, pp)
    if par.dp is not None and par.dp != dp:
        errors.append(f"parallel.dp={par.dp} but the trainer's {world} rank(s) / (parallel.tp x parallel.pp "
                      f"= {tp * pp}) give DP={dp}")
    want = "cpu" if cpu else "sglang"
    if ro.backend != want:
        errors.append(f"rollout.backend={ro.backend!r} on {'CPU' if cpu else 'GPU'} nodes "
                      f"(cluster.gpus_per_node={g}): set rollout.backend={want}")
    if recipe.model.hf_path is None and recipe.model.tiny is None:
        errors.append("model.hf_path is not set: the engines load Hugging Face weights")
    if bool(ro.engine_urls) or ro.router_url is not None:
        errors.append("rollout.engine_urls / rollout.router_url are set: the Slurm launch starts its own "
                      "fleet; leave them empty (run the trainer alone to use an external fleet)")
    for key in ("account",) + (() if cpu else ("container_image",)):
        if not getattr(c, key):
            errors.append(f"cluster.{key} is not set (recipe, --cluster FILE or --{key.replace('_', '-')})")
    pl = dict(trainer_procs_per_node=slots, dp=dp, gpu=not cpu, engines=[], rollout_nodes=0, router_port=None)
    if c.rollout_nodes < 1:
        errors.append(f"cluster.rollout_nodes={c.rollout_nodes}: the rollout fleet needs at least one node")
    else:
        pl["engines"] = _slurm_engines(recipe, slots, cpu, errors)
        pl["rollout_nodes"] = c.rollout_nodes
        if c.use_router:
            pl["router_port"] = c.router_port
            n_ports = max(len(pl["engines"]), 1)
            if c.engine_port_base <= c.router_port < c.engine_port_base + n_ports:
                errors.append(f"cluster.router_port={c.router_port} collides with the engine ports "
                              f"{c.engine_port_base}..{c.engine_port_base + n_ports - 1} "
                              "(cluster.engine_port_base)")
    total = c.trainer_nodes + c.rollout_nodes
    if c.max_nodes is not None and total > c.max_nodes:
        errors.append(f"the job needs cluster.trainer_nodes + cluster.rollout_nodes = {total} nodes but "
                      f"cluster.max_nodes={c.max_nodes}")
    return pl


def _slurm_engines(recipe, slots: int, cpu: bool, errors: list[str]) -> list[EngineSlot]:
    """The engines on the rollout nodes (``slots`` GPUs, or one CPU engine, per node)."""
    c, ro = recipe.cluster, recipe.rollout
    g, et = c.gpus_per_node, ro.engine_tp
    rgpus = c.rollout_nodes * slots
    if cpu and et != 1:
        errors.append(CPU_ENGINE_TP.format(et=et))
    elif et > slots:
        errors.append(f"rollout.engine_tp={et} exceeds cluster.gpus_per_node={g}: an engine must fit on one node")
    elif slots % et != 0:
        errors.append(f"rollout.engine_tp={et} must divide cluster.gpus_per_node={g} (engines may "
                      "not straddle nodes)")
    elif rgpus % et != 0:
        errors.append(f"rollout.engine_tp={et} must divide the rollout GPUs = cluster.rollout_nodes x "
                      f"cluster.gpus_per_node = {rgpus}")
    else:
        fit = rgpus // et
        if ro.num_engines != fit:
            where = (f"one CPU engine per rollout node: cluster.rollout_nodes = {fit}" if cpu else
                     f"the rollout GPUs (cluster.rollout_nodes x cluster.gpus_per_node = {rgpus}) hold "
                     f"{rgpus} / rollout.engine_tp={et} = {fit} engines")
            errors.append(f"rollout.num_engines={ro.num_engines} but {where}; set "
                          f"rollout.num_engines={fit} or change cluster.rollout_nodes")
        per_node = slots // et
        engines = []
        for i in range(min(ro.num_engines, fit)):
            node, k = divmod(i, per_node)
            # ports are distinct across the whole fleet, so "nodes" that share one host never collide
            engines.append(EngineSlot(i, node, -1 if cpu else k * et, c.engine_port_base + i))
        return engines
    return []


def _local_placement(recipe, local_gpus: int | None, errors: list[str]) -> dict:
    """This machine: the trainer's ranks on its GPUs (or one rank per model shard on a CPU), the engines on
    the GPUs after them; returns the ``Layout`` fields it places, appends what is wrong to ``errors``."""
    c, par, ro = recipe.cluster, recipe.parallel, recipe.rollout
    tp, pp = par.tp, par.pp
    if local_gpus is None:
        try:
            import torch

            local_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001 - no torch / broken CUDA = no GPU
            local_gpus = 0
    if c.trainer_nodes != 1:
        errors.append(f"cluster.trainer_nodes={c.trainer_nodes}: the local executor runs on this machine "
                      "only; set cluster.trainer_nodes=1 (or use --executor slurm)")
    gpu = local_gpus > 0
    if gpu:
        procs = min(c.gpus_per_node, local_gpus) if c.gpus_per_node else local_gpus
    else:
        procs = tp * pp  # CPU: one rank per model shard (data parallel size 1)
    if procs % (tp * pp) != 0:
        errors.append(f"trainer ranks on this machine = {procs} is not a multiple of parallel.tp x "
                      f"parallel.pp = {tp * pp}")
    pl = dict(trainer_procs_per_node=procs, dp=_dp_of(procs, tp, pp), gpu=gpu, engines=[], rollout_nodes=0,
              router_port=None)
    external = bool(ro.engine_urls) or ro.router_url is not None
    if external or recipe.model.hf_path is None:
        return pl
    et = ro.engine_tp
    if gpu:
        if ro.backend != "sglang":
            errors.append(f"rollout.backend={ro.backend!r} on a GPU machine: set rollout.backend=sglang")
        need = procs + ro.num_engines * et
        if need > local_gpus:
            errors.append(f"this machine has {local_gpus} GPUs but the trainer ({procs}) + "
                          f"rollout.num_engines x rollout.engine_tp ({ro.num_engines} x {et}) need {need}; "
                          "lower cluster.gpus_per_node or rollout.num_engines")
        pl["engines"] = [EngineSlot(i, 0, procs + i * et, c.engine_port_base + i) for i in range(ro.num_engines)]
        if c.use_router:
            pl["router_port"] = c.router_port
    else:
        if et != 1:
            errors.append(CPU_ENGINE_TP.format(et=et))
        pl["engines"] = [EngineSlot(i, 0, -1, c.engine_port_base + i) for i in range(ro.num_engines)]
    pl["rollout_nodes"] = 1 if pl["engines"] else 0
    return pl
