"""The shadow-recompute audit (trainer/audit.py) and the staleness bound it and the adaptive controller move
(rollout/staleness.py).

Independent references: the audit's error per staleness bucket is checked against fp64 log-probs of an HF
transformers forward pass and the A-3PO formula written out here (and against metrics mode on the same
batch); the fallback is driven by a staleness-2 simulation whose behaviour log-probs are the model's own,
two versions old; the policies' decisions are checked against the rules written in the test."""

import math

import pytest
import torch
from test_trainer_steps import dist1  # noqa: F401 - the one-rank process group
from train_samples import random_samples

from megatron_a3po import metrics as M

T = 0.7  # sampling temperature (the log-probs are of the tempered policy)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoConfig

    from megatron_a3po.models.tiny import save_tiny_hf_model

    d = save_tiny_hf_model(tmp_path_factory.mktemp("audit") / "m", "qwen2", num_hidden_layers=2)
    return d, AutoConfig.from_pretrained(d)


def _actor(tiny, mode, *, lr=1e-3, minibatches=1, mb_tokens=40, **audit):
    from megatron_a3po.config import Recipe
    from megatron_a3po.trainer.loop import build_actor

    d, cfg = tiny
    r = Recipe.model_validate({"name": "t", "model": {"hf_path": str(d)},
                               "trainer": {"mode": mode, "lr": lr, "ppo_n_minibatches": minibatches,
                                           "max_tokens_per_mb": mb_tokens, "seed": 3},
                               "rollout": {"n_samples": 4, "temperature": T, "max_staleness": 6},
                               "audit": audit})
    return build_actor(r, cfg, hf_dir=str(d))


V = 8


def _samples(seed=0):
    ss = random_samples(4, 4, seed, lambda k: (4 + k % 3, 3 + (k * 7) % 5))
    g = torch.Generator().manual_seed(seed + 100)
    for s in ss:  # staleness 0..6 (every bucket), behaviour log-probs near -2
        s.versions = (V - torch.randint(0, 7, (len(s.response_ids),), generator=g)).tolist()
    return ss


def _logp64(hf_dir, samples):
    """Per sample, the fp64 log-prob of each response token under the HF model at temperature T."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for s in samples:
            seq = torch.tensor([s.prompt_ids + s.response_ids])
            lp = torch.log_softmax(m(seq).logits[0].double() / T, -1)
            P = len(s.prompt_ids)
            out.append([float(lp[P - 1 + j, t]) for j, t in enumerate(s.response_ids)])
    return out


def _ref_errors(samples, p64, only=None):
    """fp64 mean |a - p| per bucket, a = lb + alpha (lt - lb), alpha = 1 - 1/d (d >= 2), lt = p (one
    minibatch: the current policy is the step-start policy), over the samples (ids) in ``only``."""
    sums, counts = {}, {}
    for s, ps in zip(samples, p64):
        if only is not None and id(s) not in only:
            continue
        for lb, v, p in zip(s.behave_logprobs, s.versions, ps):
            d = V - v
            alpha = 1.0 - 1.0 / d if d >= 2 else 0.0
            a = lb + alpha * (p - lb)
            b = "d1" if d <= 1 else ("d4+" if d >= 4 else f"d{d}")
            sums[b] = sums.get(b, 0.0) + abs(a - p)
            counts[b] = counts.get(b, 0) + 1
    return {b: sums[b] / counts[b] for b in sums}


def test_audit_error_equals_metrics_mode_and_fp64(dist1, tiny):
    from megatron_a3po.loss import finalize_bucket_means

    samples = _samples()
    p64 = _logp64(tiny[0], samples)
    ref = _ref_errors(samples, p64)
    assert set(ref) == {"d1", "d2", "d3", "d4+"}

    a = _actor(tiny, "loglinear", enabled=True, every=1, fraction=1.0)
    st = a.train_step(samples, V, group_size=4)
    met = finalize_bucket_means(_actor(tiny, "metrics").train_step(samples, V, group_size=4))
    for b, e in ref.items():
        assert st[M.AUDIT_ERR_BUCKET.format(bucket=b)] == pytest.approx(e, rel=1e-4, abs=1e-6), b
        assert st[M.AUDIT_ERR_BUCKET.format(bucket=b)] == pytest.approx(met[f"approx_err/loglinear/abs/{b}"],
                                                                        rel=1e-5, abs=1e-7), b
    assert st[M.AUDIT_TOKENS_FRAC] == 1.0 and st[M.AUDIT_FALLBACK] == 0.0
    assert st[M.TIME_AUDIT] > 0  # its cost is measured, beside the proximal time
    assert st[M.TIME_PROX] < st[M.TIME_AUDIT]  # loglinear still pays no forward pass for training

    # a sampled half of the micro-batches: the same measure over the samples it covered
    h = _actor(tiny, "loglinear", enabled=True, every=1, fraction=0.5)
    st = h.train_step(samples, V, group_size=4)
    audited = {id(s) for s in h.auditor.last_audited}
    assert 0 < len(audited) < len(samples)
    ref_h = _ref_errors(samples, p64, audited)
    for b in M.APPROX_ERR_BUCKETS:
        key = M.AUDIT_ERR_BUCKET.format(bucket=b)
        if b in ref_h:
            assert st[key] == pytest.approx(ref_h[b], rel=1e-4, abs=1e-6), b
        else:
            assert key not in st
    n_aud = sum(len(s.response_ids) for s in samples if id(s) in audited)
    assert st[M.AUDIT_TOKENS_FRAC] == pytest.approx(n_aud / sum(len(s.response_ids) for s in samples))


def _stale2_run(tiny, lr, steps=7, **audit):
    """A staleness-2 run on a fixed token batch: the behaviour log-probs of step V are the model's own
    log-probs two versions earlier (as an engine two weight pushes behind would report them)."""
    from megatron_a3po.trainer.batch import collate

    a = _actor(tiny, "loglinear", lr=lr, minibatches=4, mb_tokens=64, **audit)
    base = random_samples(8, 4, 5, lambda k: (4 + k % 3, 3 + (k * 7) % 5))
    hist, out = [], []
    for step in range(steps):
        mbs = [collate(base, [i], base[i].length) for i in range(len(base))]
        a.recompute_logprobs(mbs)
        hist.append([mb.prox_logp[0, len(s.prompt_ids) - 1:len(s.prompt_ids) - 1 + len(s.response_ids)].tolist()
                     for mb, s in zip(mbs, base)])
        old = max(0, step - 2)
        for s, lp in zip(base, hist[old]):
            s.behave_logprobs, s.versions = lp, [old] * len(lp)
        out.append(a.train_step(base, step, group_size=4))
    return a, out


def test_fallback_fires_with_a_large_lr_and_not_with_the_demo_lr(dist1, tiny):
    # the defaults (threshold, patience, measure), every step audited
    big, st_big = _stale2_run(tiny, 5e-2, enabled=True, every=1, policy="recompute")
    acts = [x for s in st_big for x in s.get("_audit_actions", [])]
    assert acts and acts[0]["action"] == "recompute_start" and acts[0]["bucket"] == "d2"
    first = acts[0]["step"]
    assert acts[0]["error"] > acts[0]["threshold"]
    k = big.auditor.cfg.patience
    assert [s[M.AUDIT_ERR_BUCKET.format(bucket="d2")] > acts[0]["threshold"] for s in st_big[first - k:first]] == [True] * k
    # from the next step on, it trains with recomputed log-probs (a forward pass, timed as proximal time)
    nxt = st_big[first]
    assert nxt[M.AUDIT_FALLBACK] == 1.0 and nxt[M.TIME_PROX] > 0 and M.AUDIT_TOKENS_FRAC not in nxt

    small, st_small = _stale2_run(tiny, 5e-4, enabled=True, every=1, policy="recompute")
    assert not [x for s in st_small for x in s.get("_audit_actions", [])]
    assert max(s[M.AUDIT_ERR_BUCKET.format(bucket="d2")] for s in st_small[2:]) < small.auditor.cfg.threshold
    assert all(s[M.AUDIT_FALLBACK] == 0.0 for s in st_small)


def test_bucket_fallback_trains_the_bucket_on_recomputed_logprobs(dist1, tiny):
    """Bucket scope: the d2 tokens are trained with recomputed log-probs: the importance ratio's extremes
    then equal metrics (recompute) mode's on the same batch where every token is 2 versions stale."""
    from megatron_a3po.trainer.audit import StepAudit  # noqa: F401 - the module under test

    samples = _samples(seed=2)
    for s in samples:
        s.versions = [V - 2] * len(s.response_ids)
    a = _actor(tiny, "loglinear", enabled=True, every=1, policy="recompute", recompute_scope="bucket")
    a.auditor.policy.fallback = {"d2": 1}
    st = a.train_step(samples, V, group_size=4)
    rec = _actor(tiny, "recompute").train_step(samples, V, group_size=4)
    for k in (M.RATIO_MAX, M.RATIO_MIN, M.PG_LOSS):
        assert st[k] == pytest.approx(rec[k], rel=1e-5), k
    assert st[M.AUDIT_FALLBACK] == 1.0 and st[M.TIME_PROX] > 0


# ---------------------------------------------------------------- the decisions (no model)

def _cfg(**kw):
    from megatron_a3po.config import AuditCfg

    return AuditCfg(enabled=True, every=1, threshold=0.2, patience=2, **kw)


def test_policy_acts_after_patience_once_per_excursion():
    from megatron_a3po.trainer.audit import AuditPolicy

    p = AuditPolicy(_cfg(policy="warn"), max_staleness=4)
    seq = [{"d2": 0.3}, {"d2": 0.25, "d4+": 0.5}, {"d2": 0.4}, {"d2": 0.1}, {"d2": 0.3}, {"d2": float("nan")}]
    got = [[(x["bucket"], x["action"], x["error"]) for x in p.update(i + 1, e)] for i, e in enumerate(seq)]
    # d2: over at audits 1, 2 (acts), 3 (no repeat); under at 4 (resets); over at 5, NaN at 6 (acts again)
    assert got[0] == [] and got[1] == [("d2", "warn", 0.25)] and got[2] == [] and got[3] == [] and got[4] == []
    assert len(got[5]) == 1 and got[5][0][0] == "d2" and math.isnan(got[5][0][2])
    assert p.streak["d4+"] == 1  # absent buckets keep their streak

    t = AuditPolicy(_cfg(policy="tighten", min_staleness=1), max_staleness=4)
    acts = [x for i in range(2) for x in t.update(i + 1, {"d4+": 0.9, "d2": 0.9})]
    assert [(x["bucket"], x["action"], x.get("max_staleness")) for x in acts] == [
        ("d2", "tighten", 1), ("d4+", "tighten_at_floor", 1)]
    assert t.cap == 1

    r = AuditPolicy(_cfg(policy="recompute"), max_staleness=4)
    assert r.update(1, {"d3": 0.5}) == [] and r.fallback == {}
    assert [x["action"] for x in r.update(2, {"d3": 0.5})] == ["recompute_start"] and set(r.fallback) == {"d3"}
    assert r.update(3, {"d3": 0.1}) == [] and r.update(4, {"d3": 0.21}) == []  # under once, over: keeps on
    assert r.update(5, {"d3": 0.05}) == [] and set(r.fallback) == {"d3"}
    end = r.update(6, {"d3": 0.1})  # under the threshold for `patience` (2) steps in a row: ends
    assert [(x["action"], x["error"], x["recomputed_steps"]) for x in end] == [("recompute_end", 0.1, 4)]
    assert r.fallback == {}


def test_staleness_bound_holds_the_ceiling_and_does_not_oscillate():
    from megatron_a3po.rollout.staleness import DriftController, StalenessBound

    applied = []
    b = StalenessBound(4, applied.append, controller=DriftController(
        floor=1, high=0.1, low=0.02, patience=3, cooldown=5, smoothing=0.0), signal="kl")
    # a signal that flips across the band every step never moves the bound (patience)
    for s in range(1, 21):
        b.update(s, {M.DRIFT_KL: 0.2 if s % 2 else 0.0})
    assert applied == [] and b.bound == 4
    # high for a long time: down one version at a time, one change per cooldown + patience, to the floor
    changes = [(s, b.update(s, {M.DRIFT_KL: 0.5})[0][M.STALENESS_BOUND]) for s in range(21, 61)]
    steps_at = [s for (s, v), (_, w) in zip(changes, changes[1:] + [(0, changes[-1][1])]) if v != w]
    assert applied == [3, 2, 1] and b.bound == 1
    # low: back up, never above the recipe's bound; the audit's cap lowers the ceiling at once
    for s in range(61, 120):
        b.update(s, {M.DRIFT_KL: 0.0})
    assert b.bound == 4 and max(applied) == 4
    b.update(120, {M.DRIFT_KL: 0.0, "_staleness_cap": 2})
    assert b.bound == 2
    for s in range(121, 160):
        b.update(s, {M.DRIFT_KL: 0.0})
    assert b.bound == 2 and all(x <= 4 for x in applied)
    del steps_at


def test_after_step_hands_the_audits_cap_to_the_bound_and_the_record():
    from megatron_a3po.rollout.staleness import StalenessBound
    from megatron_a3po.trainer.audit import after_step

    applied = []
    b = StalenessBound(4, applied.append)  # the audit's tighten only: no adaptive controller
    act = {"step": 7, "source": "audit", "action": "tighten", "bucket": "d3", "error": 0.4, "max_staleness": 2}
    stats = {"_audit_actions": [act], "_staleness_cap": 2, M.AUDIT_ERR: 0.4}
    rec, logged = after_step(b, 7, stats)
    assert applied == [2] and logged[M.STALENESS_BOUND] == 2.0
    assert rec["actions"][0] == act and rec["actions"][1]["source"] == "staleness_bound"
    assert rec["actions"][1]["by"] == "audit" and (rec["actions"][1]["was"], rec["actions"][1]["max_staleness"]) == (4, 2)
    assert stats == {"_audit_actions": [act], "_staleness_cap": 2, M.AUDIT_ERR: 0.4}  # read, not taken out
    assert after_step(b, 8, {}) == ({}, {M.STALENESS_BOUND: 2.0}) and applied == [2]  # the cap stays
    assert after_step(None, 9, {"_audit_actions": [act]}) == ({"actions": [act]}, {})  # warn/recompute: no bound
