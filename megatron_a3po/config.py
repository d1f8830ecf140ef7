"""The recipe schema: one typed tree that every component reads.

A recipe is a YAML file of these sections; the command line adds dotted overrides
(``trainer.mode=recompute``). Unknown keys and impossible combinations are errors that name the key.
The launcher (launch/) and the trainer (megatron_a3po.trainer) read the same object, so a layout that
validates here is the one that runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from megatron_a3po.errors import A3POError

# The YAML recipes ship beside the package (repository root / site-packages): recipes/*.yaml. They are data:
# nothing here imports the recipes folder.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


class _Strict(BaseModel):
    # NaN and infinities are never a valid setting: a schema error naming the key, not a crash later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TinyModel(_Strict):
    """A Qwen2-shaped model built locally with random weights (CPU demos and tests)."""

    hidden_size: int = Field(64, ge=1)
    intermediate_size: int = Field(128, ge=1)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    max_position_embeddings: int = Field(128, ge=2)
    tie_word_embeddings: bool = True
    # weight-init seed; None (the default): trainer.seed, so one key seeds init, sampling and data
    seed: int | None = None

    @model_validator(mode="after")
    def _heads(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.tiny.hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model.tiny.num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        return self


class ModelCfg(_Strict):
    # Where the initial weights come from: an HF directory, a Megatron torch_dist checkpoint, or a tiny
    # random Qwen2-shaped model built locally (``tiny``), with the recipe's task tokenizer.
    hf_path: str | None = None
    mcore_path: str | None = None
    tiny: TinyModel | None = None
    params_dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _one_source(self):
        n = sum(x is not None for x in (self.hf_path, self.mcore_path, self.tiny))
        if n != 1:
            raise ValueError("model: set exactly one of model.hf_path, model.mcore_path, model.tiny")
        return self


class ParallelCfg(_Strict):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    # Data-parallel size: world_size / (tp * pp) under torchrun (checked against dp when set); started
    # without torchrun, the trainer spawns tp * pp * dp local ranks (dp defaults to 1).
    dp: int | None = Field(None, ge=1)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True


class LossCfg(_Strict):
    eps_clip: float = Field(0.2, gt=0)
    eps_clip_high: float | None = Field(None, gt=0)
    dual_clip: float | None = None
    behave_weight_cap: float | None = Field(None, gt=0)
    behave_weight_cap_mode: Literal["mask", "clamp"] = "mask"
    # proximal-policy weight on the target per staleness d (loss/prox.py staleness_alpha): inverse (the
    # paper's, 1 - 1/d), linear (min(alpha_slope * (d - 1), alpha_cap)) or fixed (alpha_fixed for d > 1)
    alpha_schedule: Literal["inverse", "linear", "fixed"] = "inverse"
    alpha_slope: float = Field(0.25, gt=0)
    alpha_cap: float = Field(0.75, ge=0, le=1)
    alpha_fixed: float = Field(0.5, ge=0, le=1)
    entropy_coef: float = 0.0
    # GRPO advantages (rollout/types.py): per group, rewards minus the mean (mean), divided by the
    # unbiased std + adv_eps (mean_std) or the population std + adv_eps (mean_std_population); then,
    # with adv_batch_norm, normalised over the batch's response tokens (AReaL's A-3PO GSM8K example)
    adv_norm: Literal["mean", "mean_std", "mean_std_population"] = "mean_std"
    adv_eps: float = Field(1e-6, gt=0)
    adv_batch_norm: bool = False
    # Options below are all off by default; docs/algorithm.md has a section on each.
    # Loss aggregation (loss/aggregate.py), global over micro-batches and DP ranks: token-mean, or the mean
    # over sequences of their token means / token sums / token sums over agg_norm_constant (Dr. GRPO)
    agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = \
        "token-mean"
    agg_norm_constant: float | None = Field(None, gt=0)
    # the policy-gradient term (loss/ppo.py): ppo (clipped ratio), gspo (the sequence's geometric-mean
    # ratio, clipped), cispo (a clipped stop-gradient weight on log pi; eps_clip / eps_clip_high bound it)
    pg_variant: Literal["ppo", "gspo", "cispo"] = "ppo"
    # Rollout correction (loss/correction.py). TIS: the behaviour weight pi_prox/pi_behav truncated at
    # tis_cap, per token, per sequence (product) or per sequence geometric mean. MIS: tokens (or whole
    # sequences) whose ratio (mis_ratio: prox = pi_prox/pi_behav, theta = pi_theta/pi_behav) lies outside
    # [mis_low, mis_high] leave the loss (ICEPOP: mis_level=token with both bounds; mis_high null = no bound)
    tis_level: Literal["off", "token", "sequence", "geometric"] = "off"
    tis_cap: float = Field(2.0, gt=0)
    mis_level: Literal["off", "token", "sequence", "geometric"] = "off"
    mis_ratio: Literal["prox", "theta"] = "prox"
    mis_low: float = Field(0.0, ge=0)
    mis_high: float | None = Field(None, gt=0)
    # log k1 / k3 KL between the engine's and the trainer's log-probs, overall and per staleness bucket
    mismatch_metrics: bool = False
    # KL to a reference policy (the initial weights; loss/kl.py, trainer/reference.py): coefficient,
    # estimator, in the loss or subtracted from the reward; reference weights on the device (swapped in by
    # pointer) or in host memory (copied in for each reference pass)
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in: Literal["loss", "reward"] = "loss"
    kl_ref_placement: Literal["device", "host"] = "device"

    def alpha_kwargs(self) -> dict:
        """The schedule parameters loss/prox.py's staleness_alpha takes."""
        return dict(alpha_slope=self.alpha_slope, alpha_cap=self.alpha_cap, alpha_fixed=self.alpha_fixed)

    def correction_kwargs(self) -> dict:
        """The settings loss/correction.py's Correction takes (mis_high None: no upper bound)."""
        return dict(tis_level=self.tis_level, tis_cap=self.tis_cap, mis_level=self.mis_level,
                    mis_ratio=self.mis_ratio, mis_low=self.mis_low,
                    mis_high=float("inf") if self.mis_high is None else self.mis_high)

    @model_validator(mode="after")
    def _check(self):
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"loss.dual_clip must be > 1, got {self.dual_clip}")
        if self.agg_mode == "seq-mean-token-sum-norm" and self.agg_norm_constant is None:
            raise ValueError("loss.agg_mode=seq-mean-token-sum-norm needs loss.agg_norm_constant (e.g. the "
                             "longest response, rollout.max_new_tokens)")
        if self.mis_high is not None and self.mis_high <= self.mis_low:
            raise ValueError(f"loss.mis_high={self.mis_high} must be > loss.mis_low={self.mis_low}")
        if self.pg_variant == "cispo" and self.dual_clip is not None:
            raise ValueError("loss.dual_clip does not apply to loss.pg_variant=cispo (its weight is already bounded)")
        return self


class TrainerCfg(_Strict):
    # coupled: GRPO/PPO baseline; recompute: decoupled PPO with an extra forward pass; loglinear: A-3PO;
    # metrics: recompute + approximation-error logs.
    mode: Literal["coupled", "recompute", "loglinear", "linear", "metrics"] = "loglinear"
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-6, gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping
    ppo_n_minibatches: int = Field(4, ge=1)
    max_tokens_per_mb: int = Field(10240, ge=1)
    save_every: int = Field(0, ge=0)
    save_dir: str | None = None
    resume: bool = False
    log_dir: str = "runs/default"
    # the run's one seed: torch (trainer ranks), the tiny model's init (unless model.tiny.seed is set),
    # the synthetic dataset and the data order, the warm start's samples, and the CPU engines' sampling
    # (a per-request sampling_seed, so the draws do not depend on how the engine batches requests)
    seed: int = 1234
    # after every weight sync, compare a digest of the exported HF tensors with each engine's served
    # weights (CPU engine only: SGLang has no such endpoint); a mismatch stops the run
    verify_weight_sync: bool = False
    # evaluate the eval set (data.eval_path, or the synthetic task's held-out set) every this many steps;
    # with an eval set it also runs at step 0 and at the last step (0: only then)
    eval_every: int = Field(0, ge=0)
    # Optional supervised warm start (demo only): steps of next-token training on task answers.
    warm_start_steps: int = Field(0, ge=0)
    warm_start_lr: float = Field(1e-3, gt=0)


class RolloutCfg(_Strict):
    backend: Literal["cpu", "sglang"] = "cpu"
    # Engine URLs; empty = the trainer (or launcher) starts ``num_engines`` itself.
    engine_urls: list[str] = []
    router_url: str | None = None
    # CPU engines started by the trainer: put a real sglang-router (the dev extra) in front of them
    start_router: bool = False
    num_engines: int = Field(1, ge=1)
    engine_tp: int = Field(1, ge=1)
    max_staleness: int = Field(4, ge=0)
    max_inflight_groups: int = Field(64, ge=1)
    batch_prompts: int = Field(256, ge=1)
    n_samples: int = Field(4, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)  # -1 = all tokens
    request_timeout_s: float = Field(600.0, gt=0)
    # how long trainer rank 0 waits for its fleet at once: a batch, the end of an evaluation, a weight
    # update (None: max(600, 4 x request_timeout_s)); the trainer's process groups time out later
    # (see ``timeouts`` below), so this wait's clear error comes first
    wait_timeout_s: float | None = Field(None, gt=0)
    # an engine that does not answer GET /model_info within this many seconds is hung: it leaves the fleet
    # (its requests go elsewhere, it is removed from the router) and rejoins once synced to the current
    # weights; with no engine left for this long the run stops with a clear error
    hang_timeout_s: float = Field(30.0, gt=0, le=600)
    # disk: the trainer writes an HF dir each step, engines load it (/update_weights_from_disk).
    # nccl: trainer rank 0 broadcasts the streamed HF tensors into every engine
    # (/update_weights_from_distributed); NCCL on GPU, the same code over gloo with the CPU engine.
    # tensor: colocated SGLang servers (same machine) get shared-memory handles of the streamed HF tensors
    # (/update_weights_from_tensor); SGLang only (the CPU engine refuses it).
    weight_sync: Literal["disk", "nccl", "tensor"] = "disk"
    # address at which the engines reach trainer rank 0 for the weight-update group (None: 127.0.0.1
    # for the bundled CPU engines, else $MASTER_ADDR or this host's name)
    weight_sync_master_addr: str | None = None
    # /pause_generation mode around weight updates: abort (resubmit prompt + partial output) or in_place
    pause_mode: Literal["abort", "in_place"] = "abort"
    weight_sync_bucket_mb: int = Field(512, ge=1)
    # SGLang server knobs the launcher passes to every engine (launch/ only): the fraction of GPU memory
    # for weights + KV cache (None = SGLang's default) and any further server flags, verbatim.
    mem_fraction_static: float | None = Field(None, gt=0, lt=1)
    engine_args: list[str] = []
    # Dynamic sampling (rollout/filters.py): a finished group whose rewards are all equal (zero advantage)
    # is dropped, and replaced from the prompt stream under the same staleness bound (refill: batches keep
    # batch_prompts groups) or not (shrink: a batch holds batch_prompts minus the groups dropped since the
    # last one, at least dynamic_sampling_min_groups). After dynamic_sampling_max_drops drops since the last
    # batch (None: 4 x batch_prompts) constant groups are let through, with a warning: no run stalls.
    dynamic_sampling: Literal["off", "refill", "shrink"] = "off"
    dynamic_sampling_max_drops: int | None = Field(None, ge=1)
    dynamic_sampling_min_groups: int = Field(1, ge=1)
    # DAPO's overlong handling (rollout/filters.py): a reward penalty ramping from 0 to
    # -overlong_penalty_factor over the last overlong_buffer tokens before max_new_tokens (0: off), and
    # mask_truncated: samples cut at max_new_tokens leave the loss (still in their group's advantages)
    overlong_buffer: int = Field(0, ge=0)
    overlong_penalty_factor: float = Field(1.0, ge=0)
    mask_truncated: bool = False

    @model_validator(mode="after")
    def _top_k(self):
        if self.top_k == 0:
            raise ValueError("rollout.top_k must be -1 (all tokens) or >= 1, got 0")
        if self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(f"rollout.overlong_buffer={self.overlong_buffer} must be < rollout.max_new_tokens="
                             f"{self.max_new_tokens}")
        if self.dynamic_sampling_min_groups > self.batch_prompts:
            raise ValueError(f"rollout.dynamic_sampling_min_groups={self.dynamic_sampling_min_groups} exceeds "
                             f"rollout.batch_prompts={self.batch_prompts}")
        if self.weight_sync == "tensor" and self.backend != "sglang":
            raise ValueError("rollout.weight_sync=tensor needs rollout.backend=sglang (the CPU engine has no "
                             "/update_weights_from_tensor)")
        return self


class AuditCfg(_Strict):
    """Shadow-recompute audit of the proximal approximation (trainer/audit.py; docs/algorithm.md, "Audit").

    With ``enabled``, every ``every`` steps a ``fraction`` of the step's micro-batches is run once more with the step-start
    weights (a forward pass, no gradient) and the approximation's error against those log-probs is measured
    per staleness bucket with metrics mode's error measures. When a bucket's ``measure`` stays above
    ``threshold`` for ``patience`` audits in a row, ``policy`` acts: ``warn`` (a logged warning),
    ``tighten`` (lowers the rollout's staleness bound below that bucket, never under ``min_staleness`` and
    never above the recipe's), or ``recompute`` (trains that bucket, ``recompute_scope: bucket``, or the
    whole step, ``step``, with recomputed log-probs until its error is back under the threshold)."""

    enabled: bool = False
    every: int = Field(10, ge=1)
    fraction: float = Field(0.25, gt=0, le=1)  # of the step's micro-batches (at least one)
    measure: Literal["abs", "sq", "rel", "prob_rel", "ratio_abs", "behave_w_abs"] = "abs"
    threshold: float = Field(0.25, gt=0)
    patience: int = Field(2, ge=1)
    policy: Literal["warn", "tighten", "recompute"] = "warn"
    recompute_scope: Literal["bucket", "step"] = "step"
    min_staleness: int = Field(1, ge=0)


class AdaptiveStalenessCfg(_Strict):
    """Optional controller of the rollout's admission bound (rollout/staleness.py): between ``floor`` and
    the recipe's ``rollout.max_staleness``, driven by a drift signal: the audit's error (``audit``), one
    minus the effective sample size fraction of the behaviour-to-current importance weights (``ess``), or
    the behaviour-to-current KL (``kl``). The bound goes down one when the smoothed signal has stayed above
    ``high`` for ``patience`` steps, up one when below ``low`` as long, and then holds for ``cooldown``
    steps (the samples in flight were admitted under the old bound)."""

    enabled: bool = False
    signal: Literal["audit", "ess", "kl"] = "kl"
    floor: int = Field(1, ge=0)
    high: float = Field(0.02, gt=0)
    low: float = Field(0.002, ge=0)
    patience: int = Field(3, ge=1)
    cooldown: int = Field(10, ge=0)
    smoothing: float = Field(0.8, ge=0, lt=1)  # EMA weight on the past

    @model_validator(mode="after")
    def _band(self):
        if self.low >= self.high:
            raise ValueError(f"adaptive_staleness.low={self.low} must be below high={self.high}")
        return self


class ReplayCfg(_Strict):
    """Reproducible asynchronous runs (rollout/schedule.py, rollout/replay.py; docs/algorithm.md, "Record
    and replay"). ``record``: write ``<run dir>/schedule.jsonl`` (which weight version generated every
    segment of every trained sample, where it was interrupted, which step trained which group) and serve
    with batch-invariant CPU engines. ``schedule``: replay that file: the engines keep the few weight
    versions the bound allows and serve every request at the version the schedule names, so the run gets
    the same batches, versions and sampling seeds whatever the timing (with another ``trainer.mode``: two
    algorithms on one schedule, with common random numbers)."""

    record: bool = False
    schedule: str | None = None


class DataSpec(_Strict):
    """Where a dataset comes from (megatron_a3po/rollout/data.py). A plain string is ``{path: ...}``."""

    # a local .jsonl/.json/.parquet file, a local directory ``datasets`` can load, or a hub id (openai/gsm8k)
    path: str
    name: str | None = None   # dataset config (GSM8K: main); unused for a single file
    split: str = "train"      # unused for a single file
    question_key: str = "question"  # column holding the task's question / answer fields
    answer_key: str = "answer"


class DataCfg(_Strict):
    # a module megatron_a3po/rollout/tasks/<task>.py (gsm8k, synthetic, ...): adding a task is one file
    task: str = "gsm8k"
    train_path: str | DataSpec | None = None
    eval_path: str | DataSpec | None = None
    # synthetic task knobs (CPU demo)
    synthetic: dict = {}
    shuffle: bool = True


class EvalCfg(_Strict):
    """How the eval set is generated (megatron_a3po/rollout/evaluate.py); when: trainer.eval_every."""

    num_prompts: int | None = Field(None, ge=1)  # the first N prompts of the eval set (None: all of it)
    n_samples: int = Field(1, ge=1)  # answers per prompt; > 1 also logs eval/pass@n_samples
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    max_new_tokens: int | None = Field(None, ge=1)  # None: rollout.max_new_tokens

    @model_validator(mode="after")
    def _check(self):
        if self.n_samples > 1 and self.temperature == 0:
            raise ValueError("eval.n_samples > 1 needs eval.temperature > 0 (greedy answers are all the same)")
        return self


class WandbCfg(_Strict):
    """A Weights & Biases run beside TensorBoard (trainer/metric_log.py ``Wandb``; needs the ``wandb`` extra).
    The whole recipe is the run's config; a resumed run continues the same run (its id is kept in the run
    dir)."""

    project: str = "megatron-a3po"
    entity: str | None = None
    name: str | None = None  # None: <recipe name>-<run dir name>
    group: str | None = None  # e.g. one group per study, to compare its runs
    tags: list[str] = []
    # online: to the server (WANDB_API_KEY or `wandb login`); offline: under <run_dir>/wandb, for
    # `wandb sync` later (clusters without internet access)
    mode: Literal["online", "offline"] = "online"


class LoggingCfg(_Strict):
    """Where the metrics go besides steps.jsonl, TensorBoard (<run_dir>/tb) and summary.json, which are
    always written. ``wandb``: absent or null for none."""

    wandb: WandbCfg | None = None


class ClusterCfg(_Strict):
    """Where a launch puts things; read by launch/ only (the trainer ignores this section).

    A cluster YAML file (``python -m launch.run --cluster FILE``) holds any of these keys and is merged
    over the recipe's ``cluster:`` section before the command line's dotted overrides.
    """

    # Nodes of the Slurm heterogeneous job: group 0 runs the trainer (torchrun, one rank per GPU),
    # group 1 the rollout fleet (``num_engines`` SGLang servers + the router). Local launches use one node.
    # Local launches: the trainer takes the first min(gpus_per_node, GPUs here) GPUs and the engines the
    # ones after them (on a CPU machine: TP x PP trainer ranks and CPU engines).
    trainer_nodes: int = Field(1, ge=1)
    rollout_nodes: int = Field(0, ge=0)
    gpus_per_node: int = Field(8, ge=0)
    # Largest job the partition accepts (trainer_nodes + rollout_nodes); None = not checked.
    max_nodes: int | None = Field(None, ge=1)
    # The trainer group's image: NGC PyTorch (Transformer Engine, apex) with megatron-core and this package
    # (`pip install ".[gpu]"`). The rollout group runs SGLang's own image (`rollout_container_image`, e.g.
    # SGLang 0.5.23's release image; None = the trainer's): its torch is SGLang's pin, so this package
    # goes into it without dependencies (`pip install --no-deps .`; the fleet's code needs only the
    # standard library and torch) or runs from the code the job ships.
    container_image: str | None = None
    rollout_container_image: str | None = None
    container_mounts: list[str] = []  # "SRC:DST" pairs, as srun --container-mounts takes them
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    job_name: str = "a3po"
    # nemo-run's job directory (sbatch script, logs, shipped code) on the cluster's shared filesystem;
    # None = $NEMORUN_HOME/slurm_jobs.
    job_dir: str | None = None
    # Extra environment for every task (e.g. HF_HOME, NCCL_* settings).
    env_vars: dict[str, str] = {}
    # Ports: torchrun rendezvous on the trainer's head node; SGLang servers on each rollout node use
    # engine_port_base + (index of the engine on that node); the router listens on router_port on the
    # first rollout node.
    rdzv_port: int = Field(29500, ge=1, le=65535)
    engine_port_base: int = Field(30000, ge=1, le=65535)
    router_port: int = Field(30080, ge=1, le=65535)
    use_router: bool = True
    router_policy: Literal["random", "round_robin", "cache_aware", "power_of_two"] = "cache_aware"
    # Slurm: --exclusive on both het groups (whole nodes); the address servers bind on the rollout nodes
    # (0.0.0.0: reachable from the trainer nodes; 127.0.0.1 when every "node" is this machine); seconds
    # between nemo-run's checks that a group ended (then the others are stopped) and between group starts.
    exclusive: bool = True
    bind_host: str = "0.0.0.0"
    monitor_wait_s: int = Field(60, ge=1)
    group_start_gap_s: int = Field(30, ge=0)
    # How long the trainer waits for every engine's /health (and the router's) before it starts.
    health_timeout_s: float = Field(3600.0, gt=0)
    # Architecture used by the launcher's layout checks when model.hf_path is neither a local directory
    # with config.json nor a name in launch/arch.py: a name from that table, or a path to a config.json.
    arch: str | None = None
    memory_estimate: str | None = None  # free text: how the layout fits 80 GB cards


class Recipe(_Strict):
    name: str
    description: str = ""
    model: ModelCfg
    parallel: ParallelCfg = ParallelCfg()
    loss: LossCfg = LossCfg()
    trainer: TrainerCfg = TrainerCfg()
    rollout: RolloutCfg = RolloutCfg()
    data: DataCfg = DataCfg()
    eval: EvalCfg = EvalCfg()
    cluster: ClusterCfg = ClusterCfg()
    audit: AuditCfg = AuditCfg()
    adaptive_staleness: AdaptiveStalenessCfg = AdaptiveStalenessCfg()
    replay: ReplayCfg = ReplayCfg()
    logging: LoggingCfg = LoggingCfg()

    @model_validator(mode="after")
    def _combinations(self):
        if self.trainer.verify_weight_sync and self.rollout.backend != "cpu":
            raise ValueError("trainer.verify_weight_sync needs rollout.backend=cpu (SGLang exposes no weight digest)")
        if self.data.task == "gsm8k" and self.model.tiny is not None:
            raise ValueError("data.task=gsm8k needs a real tokenizer: set model.hf_path, not model.tiny")
        if self.loss.kl_coef and self.loss.kl_in == "reward" and self.loss.adv_batch_norm:
            raise ValueError("loss.kl_in=reward recomputes the group advantages on each data-parallel rank's "
                             "share: it cannot be combined with loss.adv_batch_norm (a whole-batch statistic)")
        need = self.trainer.ppo_n_minibatches * (self.parallel.dp or 1)
        if self.rollout.dynamic_sampling == "shrink" and self.rollout.dynamic_sampling_min_groups < need:
            raise ValueError(f"rollout.dynamic_sampling=shrink: rollout.dynamic_sampling_min_groups="
                             f"{self.rollout.dynamic_sampling_min_groups} must be at least trainer.ppo_n_minibatches"
                             f" x parallel.dp = {need} (every minibatch needs a group on every DP rank)")
        self._check_drift_and_replay()
        return self

    def _check_drift_and_replay(self):
        a, ad, rp, r = self.audit, self.adaptive_staleness, self.replay, self.rollout
        if a.enabled and self.trainer.mode in ("recompute", "metrics"):
            raise ValueError(f"audit.enabled with trainer.mode={self.trainer.mode}: the audit checks an "
                             "approximation (loglinear, linear, coupled); this mode recomputes every step already")
        if ad.enabled:
            if ad.signal == "audit" and not a.enabled:
                raise ValueError("adaptive_staleness.signal=audit needs audit.enabled=true")
            if ad.floor > r.max_staleness:
                raise ValueError(f"adaptive_staleness.floor={ad.floor} is above rollout.max_staleness={r.max_staleness}")
        if rp.record or rp.schedule is not None:
            what = "replay.schedule" if rp.schedule is not None else "replay.record"
            if r.backend != "cpu" or r.engine_urls or r.router_url is not None or r.start_router:
                raise ValueError(f"{what} needs the bundled CPU engines (rollout.backend=cpu, no engine_urls, no "
                                 "router: a router drops the replay fields of a request)")
            if r.weight_sync != "disk":
                raise ValueError(f"{what} needs rollout.weight_sync=disk (the engines keep whole versions)")
        if rp.schedule is not None and self.trainer.resume:
            raise ValueError("replay.schedule cannot be combined with trainer.resume")



# ---------------------------------------------------------------------------------------------
# Timeouts that must be ordered (docs/rollout.md, "Bounds"). While trainer rank 0 waits on its fleet, the
# other ranks wait in a collective for it. Each wait of rank 0 ends, with a clear error that rank 0 then
# hands to the other ranks in that collective (platform/ranks.py on_rank0), before the collective's own
# timeout could fire (on NCCL the watchdog kills the process: SIGABRT, no message).

# rank 0 starting the fleet before the first step: CPU engines up (engine/launch.py, 300 s), their router
# (rollout/router.py, 60 s), every server's /health (RolloutManager.start, 120 s), the weight-update group
# (NcclTransport, 300 s)
FLEET_START_S = 900.0
# what rank 0 does between two collectives besides one wait (rollout stats, logging, a checkpoint's state)
PG_MARGIN_S = 300.0


@dataclass(frozen=True)
class Timeouts:
    rollout_wait_s: float  # each wait of rank 0 for its fleet (trainer/rollout_side.py RolloutSide)
    pg_timeout_s: float  # every torch.distributed group of the trainer (platform.init_distributed)


def timeouts(rollout: RolloutCfg) -> Timeouts:
    """The trainer's two ordered bounds: rank 0's fleet waits, and the process groups' timeout after them."""
    wait = rollout.wait_timeout_s if rollout.wait_timeout_s is not None else max(600.0, 4 * rollout.request_timeout_s)
    return Timeouts(rollout_wait_s=wait, pg_timeout_s=max(wait, FLEET_START_S) + PG_MARGIN_S)


class RecipeError(A3POError, ValueError):
    pass


def resolve_recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = RECIPES_DIR / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    raise RecipeError(f"recipe {name_or_path!r} not found (a .yaml path or one of: {', '.join(known)})")


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = (), *,
                layers: list[dict] | tuple[dict, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply ``a.b=c`` overrides, validate. Errors name the file and the key.

    ``layers`` (nested dicts, e.g. ``{"cluster": {...}}`` from a cluster file) are merged over the file
    in order, before the overrides.
    """
    from omegaconf import OmegaConf

    path = resolve_recipe_path(name_or_path)
    try:
        base = OmegaConf.load(path)
    except Exception as e:  # yaml syntax
        raise RecipeError(f"{path}: cannot parse YAML: {e}") from e
    for ov in overrides:
        if "=" not in ov:
            raise RecipeError(f"override {ov!r} is not of the form key.path=value")
    try:
        merged = OmegaConf.merge(base, *[OmegaConf.create(x) for x in layers],
                                 OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(merged, resolve=True)
    except Exception as e:
        raise RecipeError(f"{path}: bad override: {e}") from e
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "<root>"
            lines.append(f"  {key}: {err['msg']}")
        raise RecipeError(f"{path}: invalid recipe\n" + "\n".join(lines)) from None



def recipe_yaml(recipe: Recipe, header: str = "") -> str:
    """A validated recipe as YAML text that ``load_recipe`` reads back as the same recipe: the one encoder
    from a Recipe to what a trainer started elsewhere reads (the launcher's job directory, a sweep's run
    directory; they write it with io.atomic_write_text). Values keep their types (no dotted overrides)."""
    from omegaconf import OmegaConf

    # OmegaConf's dumper quotes every string its own loader (load_recipe) would read as another type
    comment = "".join(f"# {ln}\n" for ln in header.splitlines())
    return comment + OmegaConf.to_yaml(OmegaConf.create(recipe.model_dump(mode="json")))
