"""TensorBoard tag names: the one list the trainer writes and tools/report reads.

Loss stats come from ``megatron_a3po.loss`` under the keys below (without the ``train/`` prefix the
trainer adds). Times are seconds per training step.
"""

PREFIX = "train/"

# loss statistics (docs/algorithm.md, "Statistics logged every step")
PG_LOSS = "loss/pg"
ENTROPY_LOSS = "loss/entropy"
RATIO_MAX, RATIO_MIN, RATIO_MEAN = "ratio/max", "ratio/min", "ratio/mean"  # r = pi_theta / pi_prox
BEHAVE_W_MAX, BEHAVE_W_MEAN = "behave_w/max", "behave_w/mean"  # w = pi_prox / pi_behave
BEHAVE_W_CAPPED, BEHAVE_W_CAPPED_FRAC = "behave_w/capped_count", "behave_w/capped_frac"
CLIP_COUNT, CLIP_FRAC, DUAL_CLIP_COUNT = "clip/count", "clip/frac", "clip/dual_count"
ENTROPY = "entropy/mean"
APPROX_KL = "approx_kl"
ALPHA_MEAN = "alpha/mean"
STALENESS_MEAN, STALENESS_MAX, STALENESS_HIST = "staleness/mean", "staleness/max", "staleness/hist"
NUM_TOKENS = "tokens/masked"
GRAD_NORM = "grad_norm"
# metrics mode: error of each approximation a against the recomputed proximal log-probs p (loss/prox.py
# approx_error_stats), token means: overall under the names below, per staleness bucket under
# "<name>/<bucket>" with bucket in APPROX_ERR_BUCKETS (d1 holds d <= 1, d4+ holds d >= 4)
APPROX_ERR_ABS = "approx_err/{method}/abs"              # |a - p|
APPROX_ERR_SQ = "approx_err/{method}/sq"                # (a - p)^2
APPROX_ERR_REL = "approx_err/{method}/rel"              # |a - p| / |p|
APPROX_ERR_PROB_REL = "approx_err/{method}/prob_rel"    # |exp(a - p) - 1|: relative error of the probability
APPROX_ERR_RATIO = "approx_err/{method}/ratio_abs"      # |exp(lt - a) - exp(lt - p)|: error of r
APPROX_ERR_BEHAVE_W = "approx_err/{method}/behave_w_abs"  # |exp(a - lb) - exp(p - lb)|: error of w
APPROX_ERR_BUCKETS = ("d1", "d2", "d3", "d4+")
# per bucket, the fraction of masked tokens in it (the weights that turn bucket sums into bucket means)
APPROX_ERR_BUCKET_FRAC = "approx_err/token_frac/{bucket}"

# rollout correction (loss/correction.py): shares of tokens / sequences truncated (TIS) or masked (MIS),
# and the final importance weight (the behaviour weight after the correction) over the kept tokens
CORR_TIS_TOKEN_FRAC = "correction/tis_truncated_token_frac"
CORR_TIS_SEQ_FRAC = "correction/tis_truncated_seq_frac"
CORR_MIS_TOKEN_FRAC = "correction/mis_masked_token_frac"
CORR_MIS_SEQ_FRAC = "correction/mis_masked_seq_frac"
CORR_IS_W_MEAN, CORR_IS_W_MAX = "correction/is_weight_mean", "correction/is_weight_max"
# engine/trainer mismatch (loss.mismatch_metrics): k1 and k3 estimates of KL(pi_engine || pi_trainer),
# overall and per staleness bucket "<name>/<bucket>" (d0 holds d <= 0, d3+ holds d >= 3)
MISMATCH_K1, MISMATCH_K3 = "mismatch/k1", "mismatch/k3"
MISMATCH_BUCKETS = ("d0", "d1", "d2", "d3+")
MISMATCH_BUCKET_FRAC = "mismatch/token_frac/{bucket}"
# KL to the reference policy (loss.kl_coef): the chosen estimator's token mean (in the loss), or the mean
# per-sample penalty subtracted from the reward (kl_in = reward); the reference forward pass's time
KL_REF = "kl_ref/mean"
KL_REF_REWARD_PENALTY = "kl_ref/reward_penalty_mean"
TIME_REF = "time/ref_logp"
# shadow-recompute audit (trainer/audit.py): the audited approximation's error against the step-start
# weights, with the audit's measure (audit.measure, one of metrics mode's), per staleness bucket
AUDIT_ERR = "audit/err"                       # over every audited token
AUDIT_ERR_BUCKET = "audit/err/{bucket}"       # per bucket (APPROX_ERR_BUCKETS), when it holds audited tokens
AUDIT_TOKENS_FRAC = "audit/tokens_frac"       # share of the step's tokens the audit's forward pass covered
AUDIT_FALLBACK = "audit/fallback"             # 1 while (a bucket of) the step trains with recomputed log-probs
AUDIT_ACTIONS = "audit/actions"               # policy actions taken after this step (details: steps.jsonl)
# behaviour -> current policy drift (rho = pi_theta / pi_behave per trained token), for the staleness controller
DRIFT_ESS = "drift/ess_frac"                  # (sum rho)^2 / (n sum rho^2): effective sample size fraction
DRIFT_KL = "drift/kl"                         # mean(rho - 1 - log rho): k3 estimate of KL(pi_behave || pi_theta)
STALENESS_BOUND = "staleness/bound"           # the rollout's admission bound in force after this step
STALENESS_DRIFT = "staleness/drift_smoothed"  # the adaptive staleness controller's smoothed drift signal

# evaluation (rollout/evaluate.py): TensorBoard tags as they are (no train/ prefix), step = evaluated version
EVAL_ACCURACY = "eval/accuracy"
EVAL_PASS_AT = "eval/pass@{k}"

# rollout / throughput
REWARD_MEAN = "reward/mean"
RESPONSE_LEN = "response/length_mean"
TRAIN_TOK_S = "throughput/train_tokens_per_s"
GEN_TOK_S = "throughput/gen_tokens_per_s"
POLICY_VERSION = "policy/version"

# per-step time breakdown (seconds)
TIME_PROX = "time/prox_logp"
TIME_AUDIT = "time/audit"  # the audit's forward pass and error measures (trainer/audit.py)
TIME_WAIT = "time/wait_rollout"
TIME_FWD_BWD = "time/fwd_bwd"
TIME_OPT = "time/optimizer"
TIME_SYNC = "time/weight_sync"
TIME_EVAL_WAIT = "time/eval_wait"  # training waiting for an evaluation to finish (before a weight push)
TIME_STEP = "time/step"
TIME_TOTAL = "time/elapsed"  # wall-clock seconds since the run started, at the end of this step
