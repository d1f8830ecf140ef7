"""The training recipe: a recipe (the YAML config) in, components wired, a lifecycle.

    setup    distributed init, the Megatron actor (TP/PP), resume from the latest checkpoint, the rollout
             side and the metric loggers (rank 0), the warm start, the version-0 weights to the fleet,
             the first evaluation
    train    repeat: batch of complete prompt groups (staleness-bounded) -> A-3PO step -> version += 1
             -> weights pushed to every engine -> checkpoint (``save``) -> metrics; returns the summary
    cleanup  the rollout side closed (engines this run started are stopped), success or not

Global rank 0 owns the rollout fleet and the logs (trainer/roles.py ``Lead``; the other ranks hold a
``Follower``, chosen once at setup). It deals each minibatch's prompt groups to the data-parallel ranks
(balanced by tokens) and sends every rank only its share.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_a3po.platform.ranks import global_rank, on_rank0, world_size

log = logging.getLogger("megatron_a3po.trainer")


def prepare_initial_model(recipe, run_dir: Path):
    """Returns (hf_config, hf_dir or None, mcore_dir or None, tokenizer_dir). Rank 0 builds tiny models."""
    from transformers import AutoConfig

    mc = recipe.model
    if mc.tiny is not None:
        init = run_dir / "init_hf"
        on_rank0(_write_tiny_model, recipe, init)  # the other ranks wait until it is there
        return AutoConfig.from_pretrained(init), str(init), None, str(init)
    if mc.hf_path is not None:
        p = Path(mc.hf_path)
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"model.hf_path={mc.hf_path}: no config.json there")
        return AutoConfig.from_pretrained(p), str(p), None, str(p)
    p = Path(mc.mcore_path)
    meta = p / "hf_config"
    if not p.exists():
        raise FileNotFoundError(f"model.mcore_path={mc.mcore_path} does not exist")
    if not (meta / "config.json").exists():
        raise FileNotFoundError(f"model.mcore_path={mc.mcore_path}: no hf_config/config.json (convert with tools.convert_ckpt)")
    return AutoConfig.from_pretrained(meta), None, str(p), str(meta)


def _write_tiny_model(recipe, init: Path) -> None:
    """The recipe's tiny random model and the task's tokenizer, as an HF dir (once: kept for a resume)."""
    if (init / "config.json").exists():
        return
    from megatron_a3po.io import atomic_dir
    from megatron_a3po.models.tiny import build_tiny_hf_model, tiny_hf_config
    from megatron_a3po.rollout.tasks import synthetic

    tok = synthetic.build_tokenizer()
    t = recipe.model.tiny
    cfg = tiny_hf_config("qwen2", vocab_size=len(tok), hidden_size=t.hidden_size,
                         intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                         num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                         max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=t.tie_word_embeddings,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with atomic_dir(init) as tmp:
        build_tiny_hf_model(cfg, seed=recipe.trainer.seed if t.seed is None else t.seed,
                            randomize_norms=False).save_pretrained(tmp)
        tok.save_pretrained(tmp)


def build_actor(recipe, hf_config, *, hf_dir: str | None = None, mcore_dir: str | None = None):
    """The actor, given its sections of the recipe."""
    from megatron_a3po.trainer.actor import Actor
    from megatron_a3po.trainer.audit import build_auditor

    return Actor(hf_config, trainer=recipe.trainer, loss=recipe.loss, parallel=recipe.parallel,
                 params_dtype=recipe.model.params_dtype, temperature=recipe.rollout.temperature,
                 hf_dir=hf_dir, mcore_dir=mcore_dir, auditor=build_auditor(recipe))


def build_rollout_side(recipe, *, run_dir: Path, tokenizer_dir: str):
    """Rank 0's rollout side, given its sections of the recipe."""
    from megatron_a3po.trainer.rollout_side import RolloutSide, controller_config

    lc = recipe.loss
    ctl = controller_config(recipe.rollout, seed=recipe.trainer.seed, shuffle=recipe.data.shuffle,
                            adv_norm=lc.adv_norm, adv_eps=lc.adv_eps, adv_batch_norm=lc.adv_batch_norm)
    return RolloutSide(recipe.rollout, recipe.data, recipe.eval, ctl, seed=recipe.trainer.seed, run_dir=run_dir,
                       tokenizer_dir=tokenizer_dir, replay=recipe.replay)


class TrainingRecipe:
    """The trainer's lifecycle for one recipe (torchtune's sense of a recipe: setup, train, save, cleanup).
    ``recipe`` is the validated config (megatron_a3po.config.Recipe); ``run_dir`` its outputs
    (default ``trainer.log_dir``). Every rank runs the same methods; rank 0's part is ``self.lead``."""

    def __init__(self, recipe, run_dir: str | Path | None = None):
        self.cfg = recipe
        self.run_dir = Path(run_dir or recipe.trainer.log_dir)
        tc = recipe.trainer
        self.save_dir = Path(tc.save_dir) if tc.save_dir else self.run_dir / "checkpoints"
        self.lead = None
        self.start_step, self.version = 0, 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._init_process()
        self.hf_config, hf_dir, mcore_dir, self.tok_dir = prepare_initial_model(self.cfg, self.run_dir)
        self.actor = build_actor(self.cfg, self.hf_config, hf_dir=hf_dir, mcore_dir=mcore_dir)
        rollout_state, resumed = self._resume()
        self.lead = self._lead_or_follower()
        tc, rc = self.cfg.trainer, self.cfg.rollout
        if not resumed and tc.warm_start_steps:
            self._warm_start()
        # bundled CPU engines start from the trainer's current weights; an external fleet is synced to them
        external = bool(rc.engine_urls) or rc.router_url is not None
        wdir = None
        if not external:
            wdir = self.run_dir / "weights" / f"v{self.version}"
            self.actor.save_hf(wdir, tokenizer_dir=self.tok_dir)
        self.lead.start(weights_dir=wdir, version=self.version, state=rollout_state)
        if external:
            self._push_weights(self.version)
        self.lead.ready(self.version)  # rank 0: the metric loggers open, the first evaluation starts
        self.dp_of = _dp_ranks()

    def _init_process(self) -> None:
        from megatron_a3po.config import timeouts
        from megatron_a3po.platform import init_distributed, is_cpu
        from megatron_a3po.trainer import terminal

        terminal.install_warning_filter()  # before megatron-core is imported: its known fallbacks, in one line
        terminal.quiet_library_progress()
        tc, pc = self.cfg.trainer, self.cfg.parallel
        if is_cpu():
            # one intra-op thread per rank: the CPU engines need the other cores, and OpenMP threads that
            # spin on an oversubscribed machine make every step several times slower
            torch.set_num_threads(int(os.environ.get("A3PO_THREADS_PER_RANK", "1")))
        init_distributed(tp=pc.tp, pp=pc.pp, seed=tc.seed,
                         timeout_s=timeouts(self.cfg.rollout).pg_timeout_s)  # after rank 0's fleet waits (config.timeouts)
        _check_dp(pc)
        torch.manual_seed(tc.seed)
        import socket

        log.info("rank %d of %d on node %s", global_rank(), world_size(),
                 os.environ.get("SLURMD_NODENAME") or socket.gethostname())
        on_rank0(self.run_dir.mkdir, parents=True, exist_ok=True)

    def _resume(self) -> tuple[dict | None, bool]:
        """With trainer.resume and a checkpoint in save_dir: load it; (rollout state, resumed)."""
        from megatron_a3po.trainer.checkpoint import latest_checkpoint, load_checkpoint, set_rng_state

        ck = latest_checkpoint(self.save_dir) if self.cfg.trainer.resume else None
        if ck is None:
            return None, False
        st = load_checkpoint(ck, self.actor)
        self.start_step, self.version = st["step"], st["version"]
        self.actor.step_count = st["step"]
        set_rng_state(st["rng"])
        return st["rollout"], True

    def _lead_or_follower(self):
        """Rank 0's ``Lead`` (the rollout side, the staleness bound, the metric loggers), or a ``Follower``."""
        from megatron_a3po.trainer.roles import Follower, Lead

        if global_rank() != 0:
            return Follower()
        side = build_rollout_side(self.cfg, run_dir=self.run_dir, tokenizer_dir=self.tok_dir)
        return Lead(self.cfg, side, run_dir=self.run_dir, start_step=self.start_step)

    def _warm_start(self) -> None:
        from megatron_a3po.trainer.batch import TrainSample

        tc = self.cfg.trainer
        for k in range(tc.warm_start_steps):
            pairs = self.lead.warm_start_samples(64, seed=tc.seed + k)
            samples = [TrainSample(prompt_ids=p, response_ids=r, behave_logprobs=[0.0] * len(r),
                                   versions=[0] * len(r), advantage=0.0) for p, r in pairs]
            nll = self.actor.sft_step(samples)
            if (k + 1) % 10 == 0:
                self.lead.info("warm start %d/%d: nll %.3f", k + 1, tc.warm_start_steps, nll)

    # ------------------------------------------------------------------ train
    def train(self) -> dict | None:
        """The steps from the start (or resumed) step to trainer.steps; the run's summary on rank 0."""
        for step in range(self.start_step, self.cfg.trainer.steps):
            self.train_step(step + 1)
        return self.lead.finish()

    def train_step(self, step: int) -> None:
        """Step ``step`` (1-based): batch, A-3PO update, weight push, checkpoint, metrics."""
        from megatron_a3po import metrics as M
        from megatron_a3po.trainer.batch import TrainSample

        tc = self.cfg.trainer
        t0 = time.perf_counter()
        V = self.version  # read once per step; constant across this step's minibatches
        groups, rollout_stats = self.lead.batch(V)
        share = _scatter_shares(groups, tc, self.actor.pad_multiple, self.dp_of)  # this rank's, per minibatch
        t_wait = time.perf_counter() - t0
        stats = self.actor.train_share([replace(sh, samples=[TrainSample(**s) for s in sh.samples]) for sh in share], V)
        self.version += 1
        t1 = time.perf_counter()
        self.lead.wait_eval()  # its own wait: the running evaluation ends before the push
        self._push_weights(self.version)
        t_sync = time.perf_counter() - t1
        record = {"step": step, "version_trained": V, "version_after": self.version,
                  "prompt_indices": [g[0]["prompt_index"] for g in groups or []],
                  "group_ids": [g[0]["group_id"] for g in groups or []]}
        if tc.verify_weight_sync:
            record.update(self._verify_sync())
        if tc.save_every and step % tc.save_every == 0:
            self.save(step)
        self.lead.report(step, self.version, record, stats, rollout_stats, {M.TIME_WAIT: t_wait, M.TIME_SYNC: t_sync},
                         t_step=t0)

    def _push_weights(self, version: int) -> None:
        """Bring every engine to the trainer's weights as ``version`` (collective: every rank calls it).

        disk: all ranks export into an HF dir (rank 0 writes), rank 0 tells the engines to load it.
        nccl: all ranks run the streaming export in step; rank 0 hands it to the transport, which
        broadcasts each bucket into the engines as it is produced (nothing touches the disk).
        """
        rc = self.cfg.rollout
        if rc.weight_sync in ("nccl", "tensor"):  # streamed: nothing touches the disk
            def export():
                return (nt for bucket in self.actor.export_hf_weights(rc.weight_sync_bucket_mb << 20) for nt in bucket)

            # one rank: after an engine died mid-push the transport exports again for the survivors; with
            # more ranks the export is a collective every rank runs once, in step (docs/rollout.md, "Bounds")
            self.lead.push_stream(version, export if world_size() == 1 else export())
            return
        wdir = self.run_dir / "weights" / f"v{version}"
        self.actor.save_hf(wdir, tokenizer_dir=self.tok_dir, fsync=False)  # read at once by the engines, deleted soon
        self.lead.push(version, wdir)

    def _verify_sync(self) -> dict:
        """Digest of the trainer's export vs each engine's served weights (collective; rank 0 compares)."""
        from megatron_a3po.convert.digest import state_digest

        named = [(n, t) for bucket in self.actor.export_hf_weights(64 << 20) for n, t in bucket]
        return self.lead.check_digests(state_digest(named))

    # ------------------------------------------------------------------ save
    def save(self, step: int) -> None:
        """Checkpoint after ``step`` (collective): the model and optimizer, and rank 0's step, version, RNG
        state and rollout state (data cursor, groups in flight)."""
        from megatron_a3po.trainer.checkpoint import rng_state, save_checkpoint

        state = {"step": step, "version": self.version, "rng": rng_state(), "rollout": self.lead.rollout_state()}
        save_checkpoint(self.save_dir, step, self.actor, self.lead.shared(state))

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        if self.lead is not None:
            self.lead.close()


def run(recipe, *, run_dir: str | Path | None = None) -> dict | None:
    """Train per ``recipe`` in this (already spawned) process; returns the summary on rank 0."""
    r = TrainingRecipe(recipe, run_dir)
    try:
        r.setup()
        return r.train()
    finally:
        r.cleanup()


def _check_dp(pc) -> None:
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    if pc.dp is not None and pc.dp != dp:
        raise ValueError(f"parallel.dp={pc.dp}, but the world of {world_size()} ranks at tp={pc.tp} "
                         f"x pp={pc.pp} gives dp={dp}")


def _dp_ranks() -> list[int]:
    """The data-parallel rank of every global rank (collective)."""
    from megatron.core import parallel_state as ps

    mine = ps.get_data_parallel_rank()
    if world_size() == 1:
        return [mine]
    out = [None] * world_size()
    dist.all_gather_object(out, mine)
    return out


def _scatter_shares(groups, tc, pad_multiple: int, dp_of: list[int]):
    """Rank 0 splits the batch (``batch.dp_split``: minibatches of whole prompt groups, each packed into
    micro-batches dealt to the DP ranks) and sends every rank only its DP rank's ``Share`` of each
    minibatch. The TP/PP ranks of one data-parallel replica receive the same shares (collective;
    ``groups`` is rank 0's)."""
    from megatron_a3po.trainer.batch import dp_split

    objs = None
    if groups is not None:
        lengths = [[len(s["prompt_ids"]) + len(s["response_ids"]) for s in g] for g in groups]
        per_dp = dp_split(groups, lengths, tc.ppo_n_minibatches, max(dp_of) + 1, tc.max_tokens_per_mb, pad_multiple)
        objs = [per_dp[d] for d in dp_of]
    if len(dp_of) == 1:
        return objs[0]
    box = [None]
    dist.scatter_object_list(box, objs, src=0)
    return box[0]


def run_worker(rank, world, recipe_dict, run_dir):
    """Entry of a spawned rank (megatron_a3po.platform.procs.run_distributed)."""
    from megatron_a3po.config import Recipe

    return run(Recipe.model_validate(recipe_dict), run_dir=run_dir)
