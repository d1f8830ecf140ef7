"""Rank 0's side of the rollout fleet: engines, prompts, the staleness-bounded controller, rollout stats.

With ``rollout.engine_urls`` (or a router) set, the fleet is external (SGLang on GPU nodes, started by
launch/). Otherwise ``rollout.num_engines`` engines are started here from the trainer's version-0 weights
and stopped at the end (they die with the trainer): CPU engines (megatron_a3po.engine), or with
``rollout.backend=sglang`` on a CPU machine the real SGLang server (``engine.launch.sglang_command`` with
the CPU flags, from the environment ``scripts/sglang_env.sh`` builds).

Weights reach the engines per ``rollout.weight_sync``: ``disk`` (an HF dir the trainer wrote), ``nccl``
(this rank broadcasts the streamed HF tensors into every engine: NCCL on GPU, gloo on CPU) or ``tensor``
(colocated SGLang servers get shared-memory handles of the streamed tensors).
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from megatron_a3po import metrics as M
from megatron_a3po.config import DataCfg, EvalCfg, ReplayCfg, RolloutCfg, timeouts
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
                            # seeded requests on the CPU engine (reproducible demo runs); SGLang samples
                            # with its own generator, as a GPU deployment does
                            sampling_seed=seed if r.backend == "cpu" else None,
                            pause_mode=r.pause_mode, adv_norm=adv_norm, adv_eps=adv_eps,
                            adv_batch_norm=adv_batch_norm, dynamic_sampling=r.dynamic_sampling,
                            ds_max_drops=r.dynamic_sampling_max_drops, ds_min_groups=r.dynamic_sampling_min_groups,
                            overlong_buffer=r.overlong_buffer, overlong_penalty_factor=r.overlong_penalty_factor)


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
        # each wait for the fleet (a batch, an evaluation's end, a weight update) ends within this, before
        # the other trainer ranks' collective times out (config.timeouts)
        self.wait_s = timeouts(rollout).rollout_wait_s
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
        self._batch_rewards: list[float] = []  # every sample's reward of the last batch, masked ones too
        self._truncated = [0, 0]  # samples of the last batch taken out by rollout.mask_truncated, of all
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
            from megatron_a3po.engine.launch import launch_engines
            from megatron_a3po.platform import is_cpu
            from megatron_a3po.platform.keys import new_key

            if rc.backend == "sglang":
                if not is_cpu():
                    raise ValueError("rollout.backend=sglang on GPUs needs rollout.engine_urls or rollout.router_url "
                                     "(launch/ starts the SGLang fleet)")
                # SGLang's own server on this CPU (its environment: scripts/sglang_env.sh), started with the
                # command line launch/ writes for GPU nodes plus the CPU flags; bound to 127.0.0.1, no key
                # (SGLang takes one only as a flag, which ps would show)
                kw = {"backend": "sglang", "extra_args": ["--random-seed", str(self.seed), *rc.engine_args]}
            else:
                # --random-seed: the draws of requests without a sampling_seed (the controller seeds its own)
                self.api_key = new_key()  # a key per run for the engines started here (in their environment)
                extra = ["--random-seed", str(self.seed)]
                if self.replay.record or self.schedule is not None:
                    extra.append("--enable-deterministic-inference")
                if self.schedule is not None:
                    extra += ["--keep-weight-versions", str(self.schedule.header["max_staleness"] + 1)]
                kw = {"api_key": self.api_key, "weights_root": self.run_dir, "extra_args": extra}
            self.engines = launch_engines(weights_dir, n=rc.num_engines, version=str(version),
                                          log_dir=self.run_dir / "engines", **kw)
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
                                 # a fleet this run did not start serves someone else's weights and version
                                 # (SGLang's "default", an earlier run's): nothing until the first push
                                 fleet_synced=bool(self.engines), schedule=self.schedule)
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
        return self.rc.weight_sync in ("nccl", "tensor")

    def _transport(self):
        import os
        import socket

        from megatron_a3po.platform import is_cpu
        from megatron_a3po.rollout import DiskTransport, NcclTransport, TensorTransport

        rc = self.rc
        if rc.weight_sync == "disk":
            return DiskTransport()
        if rc.weight_sync == "tensor":
            return TensorTransport(bucket_bytes=rc.weight_sync_bucket_mb << 20, server_tp=rc.engine_tp)
        addr = rc.weight_sync_master_addr or (
            "127.0.0.1" if not rc.engine_urls and rc.router_url is None
            else os.environ.get("MASTER_ADDR") or socket.gethostname())
        # one group name per run directory: a resumed run destroys its own stale group on the servers, and
        # runs sharing a fleet never collide; the group's store listens on a free port before the engines
        # are told it (weights.py)
        import hashlib

        name = "a3po_weights_" + hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:12]
        return NcclTransport(addr, backend="gloo" if is_cpu() else "nccl", group_name=name,
                             bucket_bytes=rc.weight_sync_bucket_mb << 20, server_tp=rc.engine_tp)

    def close(self):
        try:
            if self._eval_future is not None:
                self._eval_future.cancel()
            if self.rm is not None:
                self.rm.close_transport()  # the servers drop this run's update group (an external fleet lives on)
                self.rm.close()
        finally:
            if self.router is not None:
                self.router.stop()
            for e in self.engines:
                e.stop()

    # ------------------------------------------------------------------ per step
    def _waited_too_long(self, what: str, e: BaseException):
        from megatron_a3po.rollout import RolloutError

        return RolloutError(f"{what} not done within {self.wait_s:.0f} s (rollout.wait_timeout_s; see "
                            f"docs/rollout.md, Bounds): {e or type(e).__name__}")

    def get_batch(self, current_version: int) -> list[list[dict]]:
        """The next batch's groups, as the trainer's samples; with ``rollout.mask_truncated`` without the
        samples cut at max_new_tokens (rollout/filters.py; their rewards still count in the logged mean)."""
        from megatron_a3po.rollout.filters import drop_truncated

        rc = self.rc
        try:
            batch = self.rm.get_batch(rc.batch_prompts, current_version, timeout=self.wait_s)
        except TimeoutError as e:
            raise self._waited_too_long(f"a batch of {rc.batch_prompts} groups for version {current_version}",
                                        e) from None
        if self.recorder is not None:
            self.recorder.record(current_version, batch.groups)
        groups = batch.groups
        self._batch_rewards = [s.reward for s in batch.samples]
        self._truncated = [0, len(self._batch_rewards)]
        if rc.mask_truncated:
            groups, self._truncated[0] = drop_truncated(groups)
        return [[dict(prompt_ids=s.prompt_ids, response_ids=s.response_ids, behave_logprobs=s.behave_logprobs,
                      versions=s.versions, advantage=s.advantage, reward=s.reward, group_id=s.group_id,
                      prompt_index=s.prompt_index)
                 for s in g] for g in groups]

    def stats(self, current_version: int, groups) -> dict:
        samples = [s for g in groups for s in g]
        stale = [current_version - v for s in samples for v in s["versions"]]
        m = self.rm.metrics()
        rewards = self._batch_rewards or [s["reward"] for s in samples]
        out = {
            M.REWARD_MEAN: statistics.fmean(rewards),
            M.RESPONSE_LEN: statistics.fmean(len(s["response_ids"]) for s in samples) if samples else 0.0,
            "_staleness_values": stale,  # TensorBoard histogram; mean/max come from the loss stats
            M.GEN_TOK_S: float(m.get("rollout/gen_tokens_per_s", 0.0)),
        }
        if self.rc.mask_truncated:  # the share of this batch's samples taken out of the loss
            masked, total = self._truncated
            out["rollout/truncated_masked_frac"] = masked / max(1, total)
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
                         reward_timeout_s=self.controller_cfg.reward_timeout_s)
        self._eval_future = self.rm.start_eval(self.eval_prompts, cfg, version)

    def wait_eval(self) -> None:
        """Block until the running evaluation (if any) is done; its result joins ``take_eval_results``."""
        import time

        if self._eval_future is None:
            return
        t0 = time.perf_counter()
        fut, self._eval_future = self._eval_future, None
        try:
            self._eval_done.append(fut.result(timeout=self.wait_s))
        except TimeoutError as e:
            fut.cancel()
            raise self._waited_too_long("the running evaluation", e) from None
        self.eval_wait_s += time.perf_counter() - t0

    def take_eval_wait_s(self) -> float:
        """Seconds training waited for evaluations to end since the last call."""
        out, self.eval_wait_s = self.eval_wait_s, 0.0
        return out

    def take_eval_results(self) -> list:
        """Evaluations finished since the last call (``EvalResult``s, oldest first)."""
        if self._eval_future is not None and self._eval_future.done():
            self.wait_eval()
        out, self._eval_done = self._eval_done, []
        return out

    def update_weights(self, version: int, weights_dir: Path | None = None, named_tensors=None):
        """Push ``version`` to every engine: from ``weights_dir`` (disk) or ``named_tensors`` (nccl,
        tensor): an iterator of ``(name, tensor)``, or a callable returning a fresh one (an engine lost
        during the push is then survived: the others get the weights again from a new export).
        A running evaluation finishes first, so every eval token comes from the version it evaluates."""
        self.wait_eval()
        try:
            if self.streams_weights:
                self.rm.update_weights(version, named_tensors=named_tensors, timeout=self.wait_s)
                return
            self.rm.update_weights(version, hf_dir=str(weights_dir), timeout=self.wait_s)
        except TimeoutError as e:
            raise self._waited_too_long(f"the weight update to version {version}", e) from None
        self._weight_dirs.append(Path(weights_dir))
        while len(self._weight_dirs) > 2:  # engines now serve the newest; keep one older for debugging
            shutil.rmtree(self._weight_dirs.pop(0), ignore_errors=True)

    def engine_digests(self) -> dict[str, str]:
        """Each engine's digest of the weights it serves (CPU engines' /weights_digest)."""
        import httpx

        from megatron_a3po.platform.keys import auth_headers

        urls = list(self.rc.engine_urls) or [e.url for e in self.engines]
        return {u: httpx.get(u + "/weights_digest", timeout=60, headers=auth_headers(self.api_key)).json()["digest"]
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
