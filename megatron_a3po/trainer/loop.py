"""The training loop: recipe in, components wired, loop.

    recipe -> Megatron actor (TP/PP) -> version-0 weights -> rollout fleet (SGLang or the CPU engine)
    repeat: batch of complete prompt groups (staleness-bounded) -> A-3PO step -> version += 1
            -> weights pushed to every engine -> log, checkpoint

Global rank 0 owns the rollout fleet and the logs. It deals each minibatch's prompt groups to the
data-parallel ranks (balanced by tokens) and sends every rank only its share.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_a3po import metrics as M

log = logging.getLogger("megatron_a3po.trainer")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _bcast(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _on_rank0(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on global rank 0 only; collective: every rank calls it (the others pass what
    they like as ``fn``). An exception there is raised on EVERY rank: the other ranks, which wait here for
    rank 0 (its fleet waits: a batch, an evaluation, a weight update), exit with rank 0's error instead of
    sitting in a collective until its timeout (config.timeouts orders the two). Returns fn's result on
    rank 0, None elsewhere."""
    if _rank() != 0:
        failure = _bcast(None)
        if failure is not None:
            log.error("rank %d: stopping, rank 0 failed: %s: %s", _rank(), type(failure).__name__, failure)
            raise failure
        return None
    try:
        out = fn(*args, **kwargs)
    except Exception as e:
        _bcast(_portable(e))
        raise
    _bcast(None)
    return out


def _portable(e: Exception) -> Exception:
    """``e`` if it pickles (to reach the other ranks as it is), else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any exception object
        return RuntimeError(f"{type(e).__name__}: {e}")


def prepare_initial_model(recipe, run_dir: Path):
    """Returns (hf_config, hf_dir or None, mcore_dir or None, tokenizer_dir). Rank 0 builds tiny models."""
    from transformers import AutoConfig

    mc = recipe.model
    if mc.tiny is not None:
        init = run_dir / "init_hf"
        if _rank() == 0 and not (init / "config.json").exists():
            from megatron_a3po.io import atomic_dir
            from megatron_a3po.models.tiny import build_tiny_hf_model, tiny_hf_config
            from megatron_a3po.rollout.tasks import synthetic

            tok = synthetic.build_tokenizer()
            t = mc.tiny
            cfg = tiny_hf_config("qwen2", vocab_size=len(tok), hidden_size=t.hidden_size,
                                 intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                                 num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                                 max_position_embeddings=t.max_position_embeddings,
                                 tie_word_embeddings=t.tie_word_embeddings,
                                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)
            with atomic_dir(init) as tmp:
                build_tiny_hf_model(cfg, seed=recipe.trainer.seed if t.seed is None else t.seed,
                                    randomize_norms=False).save_pretrained(tmp)
                tok.save_pretrained(tmp)
        _barrier()
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


def build_actor(recipe, hf_config, *, hf_dir: str | None = None, mcore_dir: str | None = None):
    """The actor, given its sections of the recipe."""
    from megatron_a3po.trainer.actor import Actor
    from megatron_a3po.trainer.audit import build_auditor

    return Actor(hf_config, trainer=recipe.trainer, loss=recipe.loss, parallel=recipe.parallel,
                 params_dtype=recipe.model.params_dtype, temperature=recipe.rollout.temperature,
                 hf_dir=hf_dir, mcore_dir=mcore_dir, auditor=build_auditor(recipe))


def build_rollout_side(recipe, *, run_dir: Path, tokenizer_dir: str):
    """Rank 0's rollout side, given its sections of the recipe."""
    from megatron_a3po.trainer.fleet import RolloutSide, controller_config

    lc = recipe.loss
    ctl = controller_config(recipe.rollout, seed=recipe.trainer.seed, shuffle=recipe.data.shuffle,
                            adv_norm=lc.adv_norm, adv_eps=lc.adv_eps, adv_batch_norm=lc.adv_batch_norm)
    return RolloutSide(recipe.rollout, recipe.data, recipe.eval, ctl, seed=recipe.trainer.seed, run_dir=run_dir,
                       tokenizer_dir=tokenizer_dir, replay=recipe.replay)


def run(recipe, *, run_dir: str | Path | None = None) -> dict:
    """Train per ``recipe`` in this (already spawned) process; returns the summary on rank 0."""
    from megatron_a3po.config import timeouts
    from megatron_a3po.loss import finalize_bucket_means
    from megatron_a3po.platform import init_distributed, is_cpu
    from megatron_a3po.rollout.staleness import StalenessBound
    from megatron_a3po.trainer.audit import after_step
    from megatron_a3po.trainer.batch import TrainSample
    from megatron_a3po.trainer.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state

    from megatron_a3po.trainer import terminal

    terminal.install_warning_filter()  # before megatron-core is imported: its known fallbacks, in one line
    terminal.quiet_library_progress()
    tc, rc = recipe.trainer, recipe.rollout
    run_dir = Path(run_dir or tc.log_dir)
    if is_cpu():
        # one intra-op thread per rank: the CPU engines need the other cores, and OpenMP threads that
        # spin on an oversubscribed machine make every step several times slower
        torch.set_num_threads(int(os.environ.get("A3PO_THREADS_PER_RANK", "1")))
    init_distributed(tp=recipe.parallel.tp, pp=recipe.parallel.pp, seed=tc.seed,
                     timeout_s=timeouts(rc).pg_timeout_s)  # after rank 0's fleet waits (config.timeouts)
    _check_dp(recipe.parallel)
    torch.manual_seed(tc.seed)
    rank = _rank()
    import socket

    log.info("rank %d of %d on node %s", rank, dist.get_world_size() if dist.is_initialized() else 1,
             os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    hf_config, hf_dir, mcore_dir, tok_dir = prepare_initial_model(recipe, run_dir)
    actor = build_actor(recipe, hf_config, hf_dir=hf_dir, mcore_dir=mcore_dir)

    start_step, version, rollout_state, resumed = 0, 0, None, False
    save_dir = Path(tc.save_dir) if tc.save_dir else run_dir / "checkpoints"
    if tc.resume:
        ck = latest_checkpoint(save_dir)
        if ck is not None:
            st = load_checkpoint(ck, actor)
            start_step, version, rollout_state = st["step"], st["version"], st["rollout"]
            actor.step_count = st["step"]
            set_rng_state(st["rng"])
            resumed = True

    if rank == 0:  # one history: records of steps after the one resumed from are replaced, not repeated
        _cut_history(run_dir / "steps.jsonl", start_step)
    side = build_rollout_side(recipe, run_dir=run_dir, tokenizer_dir=tok_dir) if rank == 0 else None
    bound = StalenessBound.from_recipe(recipe, side.set_max_staleness) if rank == 0 else None
    t_start = time.perf_counter()
    try:
        if not resumed and tc.warm_start_steps:
            _warm_start(actor, side, recipe)
        # bundled CPU engines start from the trainer's current weights; an external fleet is synced to them
        external = bool(rc.engine_urls) or rc.router_url is not None
        wdir = None
        if not external:
            wdir = run_dir / "weights" / f"v{version}"
            actor.save_hf(wdir, tokenizer_dir=tok_dir)
        _on_rank0(lambda: side.start(weights_dir=wdir, version=version, state=rollout_state))
        if external:
            _push_weights(actor, side, recipe, version, run_dir, tok_dir)
        writer = _writer(run_dir, purge_step=start_step) if rank == 0 else None
        if rank == 0 and (line := terminal.known_warnings_line()):
            log.info(line)
        evaluating = rank == 0 and side.has_eval
        if evaluating and (start_step == 0 or (tc.eval_every and start_step % tc.eval_every == 0)):
            side.start_eval(version)  # runs while the first step trains; the next weight push waits for it
        bar = terminal.Progress(start_step, tc.steps) if rank == 0 else None
        history, eval_history = [], []
        dp_of = _dp_ranks()
        for step in range(start_step, tc.steps):
            t0 = time.perf_counter()
            V = version  # read once per step; constant across this step's minibatches
            groups, rollout_stats = _on_rank0(_batch_and_stats, side, V) or (None, None)
            share = _scatter_shares(groups, tc.ppo_n_minibatches, dp_of)  # this rank's groups, per minibatch
            t_wait = time.perf_counter() - t0
            stats = actor.train_share([[TrainSample(**s) for g in mb for s in g] for mb in share], V)
            version += 1
            t1 = time.perf_counter()
            _on_rank0(lambda: side.wait_eval())  # its own wait: the running evaluation ends before the push
            _push_weights(actor, side, recipe, version, run_dir, tok_dir)
            t_sync = time.perf_counter() - t1
            record = {"step": step + 1, "version_trained": V, "version_after": version,
                      "prompt_indices": [g[0]["prompt_index"] for g in groups or []],
                      "group_ids": [g[0]["group_id"] for g in groups or []]}
            if tc.verify_weight_sync:
                record.update(_verify_sync(actor, side))
            if tc.save_every and (step + 1) % tc.save_every == 0:
                state = {"step": step + 1, "version": version, "rng": rng_state(),
                         "rollout": side.state_dict() if rank == 0 else None}
                save_checkpoint(save_dir, step + 1, actor, _bcast(state))
            if rank == 0:
                stats = finalize_bucket_means(stats)  # metrics mode: per-staleness shares -> bucket means
                record.update(after_step(bound, step + 1, stats))  # the audit's actions, the staleness bound
                stats.update(rollout_stats)
                stats[M.TIME_WAIT] = t_wait
                stats[M.TIME_SYNC] = t_sync
                if evaluating:
                    t1 = time.perf_counter()
                    done = side.take_eval_results()  # those the weight push waited for, or already done
                    last = step + 1 == tc.steps
                    if last or (tc.eval_every and (step + 1) % tc.eval_every == 0):
                        side.start_eval(version)
                        if last:  # nothing left to overlap with
                            side.wait_eval()
                            done += side.take_eval_results()
                    stats[M.TIME_EVAL_WAIT] = side.eval_wait_s + (time.perf_counter() - t1 if last else 0.0)
                    side.eval_wait_s = 0.0
                    if done:
                        record["eval"] = [_log_eval(writer, run_dir, r) for r in done]
                        eval_history += record["eval"]
                stats[M.TIME_STEP] = time.perf_counter() - t0
                stats[M.TIME_TOTAL] = time.perf_counter() - t_start
                stats[M.POLICY_VERSION] = version
                stats[M.TRAIN_TOK_S] = stats.pop("tokens/trained") / max(stats["time/train"], 1e-9)
                _log_step(writer, bar, step, stats)
                history.append(stats)
                record["stats"] = {k: v for k, v in stats.items() if not k.startswith("_")}
                _append_jsonl(run_dir / "steps.jsonl", record)
        summary = None
        if rank == 0:
            writer.close()
            bar.close()
            summary = _summary(recipe, history, run_dir, time.perf_counter() - t_start, side, eval_history)
        return summary
    finally:
        if side is not None:
            side.close()


def _batch_and_stats(side, version: int):
    groups = side.get_batch(version)
    return groups, side.stats(version, groups)


def _check_dp(pc) -> None:
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    if pc.dp is not None and pc.dp != dp:
        raise ValueError(f"parallel.dp={pc.dp}, but the world of {dist.get_world_size()} ranks at tp={pc.tp} "
                         f"x pp={pc.pp} gives dp={dp}")


def _dp_ranks() -> list[int]:
    """The data-parallel rank of every global rank (collective)."""
    from megatron.core import parallel_state as ps

    mine = ps.get_data_parallel_rank()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def _scatter_shares(groups, n_minibatches: int, dp_of: list[int]):
    """Rank 0 deals each minibatch's prompt groups to the DP ranks by tokens (packing.plan_data_parallel)
    and sends every rank only its DP rank's share: ``share[k]`` = this rank's groups of minibatch k.
    The TP/PP ranks of one data-parallel replica receive the same share (collective)."""
    from megatron_a3po.trainer.packing import plan_data_parallel

    dp = max(dp_of) + 1
    objs = None
    if _rank() == 0:
        tokens = [sum(len(s["prompt_ids"]) + len(s["response_ids"]) for s in g) for g in groups]
        plan = plan_data_parallel(tokens, n_minibatches, dp)
        per_dp = [[[groups[g] for g in mb[r]] for mb in plan] for r in range(dp)]
        objs = [per_dp[d] for d in dp_of]
    if len(dp_of) == 1:
        return objs[0]
    box = [None]
    dist.scatter_object_list(box, objs, src=0)
    return box[0]


def _push_weights(actor, side, recipe, version: int, run_dir: Path, tok_dir) -> None:
    """Bring every engine to the trainer's weights as ``version`` (collective: every rank calls it).

    disk: all ranks export into an HF dir (rank 0 writes), rank 0 tells the engines to load it.
    nccl: all ranks run the streaming export in step; rank 0 hands it to the transport, which
    broadcasts each bucket into the engines as it is produced (nothing touches the disk).
    """
    if recipe.rollout.weight_sync in ("nccl", "tensor"):  # streamed: nothing touches the disk
        named = (nt for bucket in actor.export_hf_weights(recipe.rollout.weight_sync_bucket_mb << 20) for nt in bucket)

        def push():
            try:
                side.update_weights(version, named_tensors=named)
            finally:  # after a failed push: the rest of the export's collectives, with the other ranks
                for _ in named:
                    pass

        if side is None:
            for _ in named:  # the other ranks' half of the export's collectives
                pass
        _on_rank0(push)
        return
    wdir = run_dir / "weights" / f"v{version}"
    actor.save_hf(wdir, tokenizer_dir=tok_dir, fsync=False)  # read at once by the engines, deleted soon
    _on_rank0(lambda: side.update_weights(version, wdir))


def _append_jsonl(path: Path, obj) -> None:
    import json

    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _cut_history(path: Path, last_step: int) -> None:
    """Keep the records of steps 1..``last_step`` of ``path`` (atomic rewrite); a line a kill cut short
    is dropped."""
    import json

    from megatron_a3po.io import atomic_write_text

    if not path.exists():
        return
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= last_step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        log.info("%s: starting at step %d, dropped %d later or unreadable record(s)", path, last_step + 1, dropped)
        atomic_write_text(path, "".join(x + "\n" for x in keep))


def _verify_sync(actor, side) -> dict:
    """Digest of the trainer's export vs each engine's served weights (collective; rank 0 compares)."""
    from megatron_a3po.convert.digest import state_digest

    named = [(n, t) for bucket in actor.export_hf_weights(64 << 20) for n, t in bucket]
    mine = state_digest(named)
    if side is None:
        return {}
    theirs = side.engine_digests()
    bad = {u: d for u, d in theirs.items() if d != mine}
    if bad:
        raise RuntimeError(f"weight sync check failed: trainer digest {mine[:12]}, engines {bad}")
    return {"weights_digest": mine, "engine_digests": theirs}


def run_worker(rank, world, recipe_dict, run_dir):
    """Entry of a spawned rank (megatron_a3po.platform.procs.run_distributed)."""
    from megatron_a3po.config import Recipe

    return run(Recipe.model_validate(recipe_dict), run_dir=run_dir)


def _warm_start(actor, side, recipe):
    from megatron_a3po.trainer.batch import TrainSample

    tc = recipe.trainer
    for k in range(tc.warm_start_steps):
        pairs = side.warm_start_samples(64, seed=tc.seed + k) if side is not None else None
        pairs = _bcast(pairs)
        samples = [TrainSample(prompt_ids=p, response_ids=r, behave_logprobs=[0.0] * len(r),
                               versions=[0] * len(r), advantage=0.0) for p, r in pairs]
        nll = actor.sft_step(samples)
        if _rank() == 0 and (k + 1) % 10 == 0:
            log.info("warm start %d/%d: nll %.3f", k + 1, tc.warm_start_steps, nll)


def _writer(run_dir: Path, purge_step: int):
    """TensorBoard writer; events of steps >= ``purge_step`` from an earlier (killed) run are purged
    (scalars are logged at the 0-based step index)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)


def _log_eval(writer, run_dir: Path, res) -> dict:
    """TensorBoard ``eval/...`` at step = the evaluated version; generations to eval/v<version>.jsonl."""
    import json

    from megatron_a3po.io import atomic_write_text

    path = run_dir / "eval" / f"v{res.version}.jsonl"
    atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in res.samples))
    for k, v in res.metrics.items():
        writer.add_scalar(k, v, res.version)
    writer.flush()
    extra = "".join(f" {k.split('/', 1)[1]} {v:.3f}" for k, v in res.metrics.items() if "pass@" in k)
    log.info("eval v%d: accuracy %.3f%s on %d prompts (%.1fs)", res.version, res.metrics[M.EVAL_ACCURACY], extra,
             res.metrics["eval/n_prompts"], res.seconds)
    return {"version": res.version, **res.metrics, "seconds": res.seconds, "generations": str(path)}


def _log_step(writer, bar, step, stats):
    for k, v in stats.items():
        if isinstance(v, (int, float)):
            writer.add_scalar(M.PREFIX + k, v, step)
    hist = stats.get("_staleness_values")
    if hist:
        writer.add_histogram(M.PREFIX + M.STALENESS_HIST, torch.tensor(hist, dtype=torch.float32), step)
    writer.flush()
    r = stats.get(M.REWARD_MEAN, float("nan"))
    bar.update(reward=f"{r:.3f}", stale=f"{stats.get(M.STALENESS_MEAN, 0):.2f}",
               prox_ms=f"{1e3 * stats.get(M.TIME_PROX, 0):.2f}")
    log.info("step %d v%d reward %.3f entropy %.3f clip %.3f stale %.2f/%d grad %.3f | wait %.2fs prox %.2fms "
             "fwdbwd %.2fs opt %.2fs sync %.2fs", step + 1, stats.get(M.POLICY_VERSION, 0), r,
             stats.get(M.ENTROPY, 0), stats.get(M.CLIP_FRAC, 0), stats.get(M.STALENESS_MEAN, 0),
             int(stats.get(M.STALENESS_MAX, 0)), stats.get(M.GRAD_NORM, 0), stats.get(M.TIME_WAIT, 0),
             1e3 * stats.get(M.TIME_PROX, 0), stats.get(M.TIME_FWD_BWD, 0), stats.get(M.TIME_OPT, 0),
             stats.get(M.TIME_SYNC, 0))


def _summary(recipe, history, run_dir, elapsed, side, eval_history=()) -> dict:
    import statistics as st

    rewards = [h.get(M.REWARD_MEAN, 0.0) for h in history]
    k = min(20, max(1, len(rewards) // 2))
    prox = [h.get(M.TIME_PROX, 0.0) for h in history]
    stale = [h.get(M.STALENESS_MEAN, 0.0) for h in history]
    out = {
        "recipe": recipe.name,
        "mode": recipe.trainer.mode,
        "steps": len(history),
        "first_reward": st.mean(rewards[:k]) if rewards else float("nan"),
        "last_reward": st.mean(rewards[-k:]) if rewards else float("nan"),
        "window": k,
        "prox_time_total_s": sum(prox),
        "prox_time_mean_ms": 1e3 * st.mean(prox) if prox else 0.0,
        "staleness_mean": st.mean(stale) if stale else 0.0,
        "elapsed_s": elapsed,
        "steps_per_s": len(history) / elapsed if elapsed else 0.0,
        "tensorboard": str(run_dir / "tb"),
        "rollout": side.metrics() if side is not None else {},
    }
    if eval_history:
        acc = [(e["version"], e[M.EVAL_ACCURACY]) for e in eval_history]
        out["eval"] = {"first": acc[0][1], "last": acc[-1][1], "best": max(a for _, a in acc),
                       "first_version": acc[0][0], "last_version": acc[-1][0], "history": acc,
                       "n_prompts": eval_history[-1]["eval/n_prompts"]}
    from megatron_a3po.io import write_json_atomic

    write_json_atomic(run_dir / "summary.json", out)
    return out
