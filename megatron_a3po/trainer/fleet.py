"""Rank 0's side of the rollout fleet: engines, prompts, the staleness-bounded controller, rollout stats.

With ``rollout.engine_urls`` (or a router) set, the fleet is external (SGLang on GPU nodes, started by
launch/). Otherwise ``rollout.num_engines`` CPU engines (megatron_a3po.engine) are started here from
the trainer's version-0 weights and stopped at the end; they die with the trainer.

Weights reach the engines per ``rollout.weight_sync``: ``disk`` (an HF dir the trainer wrote) or
``nccl`` (this rank broadcasts the streamed HF tensors into every engine: NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from megatron_a3po import metrics as M
from megatron_a3po.config import DataCfg, EvalCfg, ReplayCfg, RolloutCfg
from megatron_a3po.rollout.controller import ControllerConfig


def controller_config(rollout: RolloutCfg, *, seed: int, shuffle: bool, adv_norm: str, adv_eps: float,
                      adv_batch_norm: bool) -> ControllerConfig:
    """The rollout controller's config from the rollout section, the run's seed, the data order and the
    advantage settings (loss.adv_*)."""
    r = rollout
    return ControllerConfig(n_samples=r.n_samples, max_inflight_groups=r.max_inflight_groups,
                            batch_groups=r.batch_prompts, max_staleness=r.max_staleness,
                            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, shuffle=shuffle, seed=seed,
                            # SGLang would give all n samples of a request one seed (identical samples)
                            sampling_seed=seed if r.backend == "cpu" else None,
                            pause_mode=r.pause_mode, adv_norm=adv_norm, adv_eps=adv_eps,
                            adv_batch_norm=adv_batch_norm)


class RolloutSide:
    """Takes its own sections only (``trainer.loop.build_rollout_side`` hands them out of a recipe):
    ``rollout`` (the fleet), ``data`` (prompts), ``eval_cfg`` (evaluation), the controller's config and
    the run's seed."""

    def __init__(self, rollout: RolloutCfg, data: DataCfg, eval_cfg: EvalCfg, controller: ControllerConfig, *,
                 seed: int, run_dir: Path, tokenizer_dir: str, replay: ReplayCfg | None = None):
        from transformers import AutoTokenizer

        from megatron_a3po.rollout.data import load_prompts
        from megatron_a3po.rollout.tasks import get_task

        self.rc, self.data, self.eval_cfg, self.controller_cfg, self.seed = rollout, data, eval_cfg, controller, seed
        self.run_dir = Path(run_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.task = get_task(data.task)
        d = data
        train, evals = d.train_path, d.eval_path
        if train is None:
            if self.task.write_datasets is None:
                raise ValueError(f"data.train_path is required for data.task={d.task}")
            train, held = self.task.write_datasets(self.run_dir / "data", seed=seed, **d.synthetic)
            evals = evals if evals is not None else held
        self.prompts = load_prompts(train, self.task, self.tokenizer, key="data.train_path")
        self.eval_prompts = (load_prompts(evals, self.task, self.tokenizer, eval_cfg.num_prompts,
                                          key="data.eval_path") if evals is not None else [])
        self._eval_future = None
        self._eval_done: list = []
        self.eval_wait_s = 0.0
        self.engines = []
        self.api_key = None  # None: $A3PO_API_KEY (set by launch/), if any
        self.router = None  # a RouterProcess (rollout.start_router)
        self.rm = None
        self._weight_dirs: list[Path] = []
        # record and replay (rollout/schedule.py, rollout/replay.py): batch-invariant engines; a replay's
        # engines keep the versions its schedule's bound allows, and pause in place (nothing aborted)
        self.replay = replay or ReplayCfg()
        self.schedule, self.recorder = None, None
        if self.replay.schedule is not None:
            import dataclasses

            from megatron_a3po.rollout.schedule import Schedule

            self.schedule = Schedule.load(self.replay.schedule)
            self.controller_cfg = dataclasses.replace(controller, pause_mode="in_place")

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, weights_dir: Path | None, version: int, state: dict | None):
        """Connect to (or start, from ``weights_dir``) the engines; the caller syncs an external fleet."""
        from megatron_a3po.rollout import RolloutManager

        rc = self.rc
        urls = list(rc.engine_urls)
        if not urls and rc.router_url is None:
            if rc.backend != "cpu":
                raise ValueError("rollout.backend=sglang needs rollout.engine_urls or rollout.router_url "
                                 "(launch/ starts the SGLang fleet)")
            from megatron_a3po.engine.launch import launch_engines
            from megatron_a3po.platform.keys import new_key

            # --random-seed: the draws of requests without a sampling_seed (the controller seeds its own)
            self.api_key = new_key()  # a key per run for the engines started here (in their environment)
            extra = ["--random-seed", str(self.seed)]
            if self.replay.record or self.schedule is not None:
                extra.append("--enable-deterministic-inference")
            if self.schedule is not None:
                extra += ["--keep-weight-versions", str(self.schedule.header["max_staleness"] + 1)]
            self.engines = launch_engines(weights_dir, n=rc.num_engines, version=str(version),
                                          log_dir=self.run_dir / "engines", api_key=self.api_key,
                                          weights_root=self.run_dir, extra_args=extra)
            urls = [e.url for e in self.engines]
            if rc.start_router:
                from megatron_a3po.rollout.router import start_router

                self.router = start_router(urls, log_path=self.run_dir / "engines" / "router.log")
        if weights_dir is not None:
            self._weight_dirs.append(Path(weights_dir))
        self.rm = RolloutManager(urls, self.prompts, self.task, self.tokenizer, self.controller_cfg,
                                 router_url=self.router.url if self.router else rc.router_url,
                                 transport=self._transport(), initial_version=version,
                                 request_timeout=rc.request_timeout_s, api_key=self.api_key,
                                 hang_timeout_s=rc.hang_timeout_s,
                                 log_hints={e.url: e.log_path for e in self.engines if e.log_path},
                                 schedule=self.schedule)
        if self.replay.record:
            from megatron_a3po.rollout.schedule import ScheduleRecorder

            c = self.controller_cfg
            self.recorder = ScheduleRecorder(
                self.run_dir / "schedule.jsonl",
                {"sampling_seed": c.sampling_seed, "n_samples": c.n_samples, "max_new_tokens": c.max_new_tokens,
                 "batch_prompts": c.batch_groups, "max_staleness": c.max_staleness},
                start_step=(state or {}).get("groups_delivered", 0) // c.batch_groups)
        if state:
            self.rm.load_state_dict(state)
        self.rm.start()
        self.rm.init_weight_transport()

    @property
    def streams_weights(self) -> bool:
        """True when pushes take streamed (name, tensor) pairs rather than an HF dir on disk."""
        return self.rc.weight_sync == "nccl"

    def _transport(self):
        import os
        import socket

        from megatron_a3po.platform import is_cpu
        from megatron_a3po.platform.procs import free_port
        from megatron_a3po.rollout import DiskTransport, NcclTransport

        rc = self.rc
        if rc.weight_sync == "disk":
            return DiskTransport()
        addr = rc.weight_sync_master_addr or (
            "127.0.0.1" if not rc.engine_urls and rc.router_url is None
            else os.environ.get("MASTER_ADDR") or socket.gethostname())
        return NcclTransport(addr, free_port(), backend="gloo" if is_cpu() else "nccl",
                             bucket_bytes=rc.weight_sync_bucket_mb << 20, server_tp=rc.engine_tp)

    def close(self):
        try:
            if self._eval_future is not None:
                self._eval_future.cancel()
            if self.rm is not None:
                self.rm.close()
        finally:
            if self.router is not None:
                self.router.stop()
            for e in self.engines:
                e.stop()

    # ------------------------------------------------------------------ per step
    def get_batch(self, current_version: int) -> list[list[dict]]:
        rc = self.rc
        batch = self.rm.get_batch(rc.batch_prompts, current_version, timeout=max(600.0, rc.request_timeout_s * 4))
        if self.recorder is not None:
            self.recorder.record(current_version, batch.groups)
        return [[dict(prompt_ids=s.prompt_ids, response_ids=s.response_ids, behave_logprobs=s.behave_logprobs,
                      versions=s.versions, advantage=s.advantage, reward=s.reward, group_id=s.group_id,
                      prompt_index=s.prompt_index)
                 for s in g] for g in batch.groups]

    def stats(self, current_version: int, groups) -> dict:
        samples = [s for g in groups for s in g]
        stale = [current_version - v for s in samples for v in s["versions"]]
        m = self.rm.metrics()
        out = {
            M.REWARD_MEAN: statistics.fmean(s["reward"] for s in samples),
            M.RESPONSE_LEN: statistics.fmean(len(s["response_ids"]) for s in samples),
            "_staleness_values": stale,  # TensorBoard histogram; mean/max come from the loss stats
            M.GEN_TOK_S: float(m.get("rollout/gen_tokens_per_s", 0.0)),
        }
        for k, v in m.items():
            if isinstance(v, (int, float)) and k.startswith("rollout/"):
                out[k] = float(v)
        return out

    # ------------------------------------------------------------------ evaluation
    @property
    def has_eval(self) -> bool:
        return bool(self.eval_prompts)

    def start_eval(self, version: int) -> None:
        """Evaluate the served weights (``version``) in the background; the next weight update waits."""
        from megatron_a3po.rollout.evaluate import EvalConfig

        self.wait_eval()
        ec, rc = self.eval_cfg, self.rc
        cfg = EvalConfig(n_samples=ec.n_samples, temperature=ec.temperature, top_p=ec.top_p, top_k=ec.top_k,
                         max_new_tokens=ec.max_new_tokens or rc.max_new_tokens,
                         reward_timeout_s=max(300.0, rc.request_timeout_s))
        self._eval_future = self.rm.start_eval(self.eval_prompts, cfg, version)

    def wait_eval(self) -> None:
        """Block until the running evaluation (if any) is done; its result joins ``take_eval_results``."""
        import time

        if self._eval_future is None:
            return
        t0 = time.perf_counter()
        fut, self._eval_future = self._eval_future, None
        self._eval_done.append(fut.result(timeout=max(600.0, self.rc.request_timeout_s * 4)))
        self.eval_wait_s += time.perf_counter() - t0

    def take_eval_results(self) -> list:
        """Evaluations finished since the last call (``EvalResult``s, oldest first)."""
        if self._eval_future is not None and self._eval_future.done():
            self.wait_eval()
        out, self._eval_done = self._eval_done, []
        return out

    def update_weights(self, version: int, weights_dir: Path | None = None, named_tensors=None):
        """Push ``version`` to every engine: from ``weights_dir`` (disk) or ``named_tensors`` (nccl).
        A running evaluation finishes first, so every eval token comes from the version it evaluates."""
        self.wait_eval()
        if self.streams_weights:
            self.rm.update_weights(version, named_tensors=named_tensors)
            return
        self.rm.update_weights(version, hf_dir=str(weights_dir))
        self._weight_dirs.append(Path(weights_dir))
        while len(self._weight_dirs) > 2:  # engines now serve the newest; keep one older for debugging
            shutil.rmtree(self._weight_dirs.pop(0), ignore_errors=True)

    def engine_digests(self) -> dict[str, str]:
        """Each engine's digest of the weights it serves (CPU engines' /debug/weights_digest)."""
        import httpx

        from megatron_a3po.platform.keys import auth_headers

        urls = list(self.rc.engine_urls) or [e.url for e in self.engines]
        return {u: httpx.get(u + "/debug/weights_digest", timeout=60, headers=auth_headers(self.api_key)).json()["digest"]
                for u in urls}

    def warm_start_samples(self, n: int, *, seed: int) -> list[tuple[list[int], list[int]]]:
        if self.task.warm_start_pairs is None:
            raise ValueError(f"trainer.warm_start_steps > 0 but task {self.data.task} has no warm_start_pairs")
        eos = self.tokenizer.eos_token_id
        out = []
        for q, resp in self.task.warm_start_pairs(n, seed=seed):
            p = self.task.build_prompt({"question": q, "answer": resp}, self.tokenizer)
            r = self.tokenizer(resp, add_special_tokens=False)["input_ids"] + [eos]
            out.append((p, r))
        return out

    def set_max_staleness(self, n: int) -> int:
        return self.rm.set_max_staleness(n)

    def state_dict(self) -> dict:
        return self.rm.state_dict()

    def metrics(self) -> dict:
        return self.rm.metrics() if self.rm is not None else {}
