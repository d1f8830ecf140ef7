"""A-3PO loss: the invariants of docs/algorithm.md, each against fp64 formulas written out here."""

import math

import pytest
import torch
import torch.distributed as dist

from megatron_a3po import metrics as M
from megatron_a3po.loss import (V_PROX_OFFSET, aggregate_stats, all_reduce_stats, approx_error_stats,
                                approximate_prox_logp, decoupled_ppo_loss, shift_to_positions,
                                staleness_alpha, staleness_stats)
from megatron_a3po.platform.procs import run_distributed

V = 6          # trainer version
B, L = 4, 12   # batch rows, positions per row
PROMPT = 3     # first positions of each row are prompt (mask 0, version -1); last 2 are padding


def _batch(seed=0, max_stale=4, spread=0.6):
    """Per-position fp64 tensors; target logp = behave logp + noise (so r is spread around 1)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, PROMPT:L - 2] = True
    versions = torch.where(mask, V - torch.randint(0, max_stale + 1, (B, L), generator=g), torch.full((B, L), -1))
    lb = torch.where(mask, -torch.rand(B, L, generator=g, dtype=torch.float64) * 3, torch.zeros(B, L, dtype=torch.float64))
    lt = lb + spread * torch.randn(B, L, generator=g, dtype=torch.float64)
    adv = torch.randn(B, L, generator=g, dtype=torch.float64)
    adv = torch.where(mask, adv, torch.zeros_like(adv))
    return dict(lb=lb, lt=lt, versions=versions, adv=adv, mask=mask)


def _alpha64(versions, cur):
    """Paper's weight on the target: 1 - 1/d for d >= 1, else 0; prompts 0 (written from the spec)."""
    out = torch.zeros(versions.shape, dtype=torch.float64)
    for idx in range(versions.numel()):
        v = int(versions.view(-1)[idx])
        d = cur - v
        if v >= 0 and d >= 1:
            out.view(-1)[idx] = 1.0 - 1.0 / d
    return out


def _ref(lt, lb, lp, adv, mask, eps=0.2, eps_high=None, dual=None, cap=None, cap_mode="mask", n=None):
    """fp64 reference: loss, d loss / d lt per token, and the clip / dual / cap flags."""
    eps_high = eps if eps_high is None else eps_high
    n = float(mask.sum()) if n is None else float(n)
    loss, grad = 0.0, torch.zeros_like(lt)
    clipped = torch.zeros_like(mask)
    dualf = torch.zeros_like(mask)
    cappedf = torch.zeros_like(mask)
    for i in range(lt.numel()):
        if not mask.view(-1)[i]:
            continue
        t, b, p, a = (float(x.view(-1)[i]) for x in (lt, lb, lp, adv))
        r = math.exp(t - p)
        w = math.exp(p - b)
        if cap is not None and w > cap:
            cappedf.view(-1)[i] = True
            if cap_mode == "mask":
                continue
            w = cap
        unclipped = -a * r
        clip_term = -a * min(max(r, 1 - eps), 1 + eps_high)
        if clip_term > unclipped:
            pg, dpg = clip_term, 0.0
            clipped.view(-1)[i] = True
        else:
            pg, dpg = unclipped, -a * r
        if dual is not None and a < 0 and pg > dual * abs(a):
            pg, dpg = dual * abs(a), 0.0
            dualf.view(-1)[i] = True
        loss += w * pg / n
        grad.view(-1)[i] = w * dpg / n
    return loss, grad, clipped, dualf, cappedf


def _run(lt, lb, lp, adv, mask, **kw):
    x = lt.clone().requires_grad_(True)
    loss, stats = decoupled_ppo_loss(x, lb, lp, adv, mask, **kw)
    loss.backward()
    return loss.detach(), x.grad, stats


# ---------------------------------------------------------------- staleness / alpha / proximal log-probs

def test_alpha_inverse_is_the_papers_weight():
    versions = torch.tensor([-1, V, V - 1, V - 2, V - 3, 0])
    alpha = staleness_alpha(versions, V)
    ref = _alpha64(versions, V)
    torch.testing.assert_close(alpha.double(), ref, atol=1e-7, rtol=0)
    # the same weight written with the proximal version v_prox = V - 1
    v_prox = V - 1
    for v, a in zip(versions.tolist(), alpha.tolist()):
        if 0 <= v < v_prox:
            assert a == pytest.approx((v_prox - v) / (V - v), abs=1e-7)
    assert V_PROX_OFFSET == 1


@pytest.mark.parametrize("schedule, kw, expect", [
    ("linear", dict(alpha_slope=0.25, alpha_cap=0.6), [0.0, 0.0, 0.0, 0.25, 0.5, 0.6]),
    ("fixed", dict(alpha_fixed=0.3), [0.0, 0.0, 0.0, 0.3, 0.3, 0.3]),
])
def test_other_alpha_schedules(schedule, kw, expect):
    versions = torch.tensor([-1, V, V - 1, V - 2, V - 3, 0])
    torch.testing.assert_close(staleness_alpha(versions, V, schedule, **kw).double(),
                               torch.tensor(expect, dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("method", ["loglinear", "linear", "behave"])
def test_prox_methods_match_fp64_formulas(method):
    d = _batch()
    a = _alpha64(d["versions"], V)
    lb, lt = d["lb"], d["lt"]
    ref = {"loglinear": lb + a * (lt - lb),
           "linear": torch.log((1 - a) * torch.exp(lb) + a * torch.exp(lt)),
           "behave": lb}[method]
    got = approximate_prox_logp(lb, lt, d["versions"], V, method)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert (a > 0).any() and (a == 0).any()


# ---------------------------------------------------------------- invariants of docs/algorithm.md

@pytest.mark.parametrize("method", ["loglinear", "linear", "behave"])
def test_inv1_full_off_policy_correction_preserved(method):
    """w * r == exp(logp - behave): with the clip out of the way, loss and grad see only that product."""
    d = _batch(seed=1)
    lp = approximate_prox_logp(d["lb"], d["lt"] + 0.3, d["versions"], V, method)  # any proximal anchor
    loss, grad, _ = _run(d["lt"], d["lb"], lp, d["adv"], d["mask"], eps_clip=1e6)
    m, n = d["mask"], d["mask"].sum().item()
    wr = torch.exp(d["lt"] - d["lb"])
    ref_loss = -(torch.where(m, wr * d["adv"], torch.zeros_like(wr))).sum() / n
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-12)
    torch.testing.assert_close(grad, torch.where(m, -wr * d["adv"] / n, torch.zeros_like(wr)), atol=1e-12, rtol=0)


def test_inv2_loglinear_ratio_is_root_of_behaviour_ratio():
    """At the step start (logp == target): r == exp((1 - alpha)(logp - behave)) = (pi/pi_b)^(1/d)."""
    d = _batch(seed=2, spread=1.0)
    a = _alpha64(d["versions"], V)
    m = d["mask"]
    lp = approximate_prox_logp(d["lb"], d["lt"], d["versions"], V, "loglinear")
    loss, grad, st = _run(d["lt"], d["lb"], lp, d["adv"], m, eps_clip=0.2)
    r64 = torch.exp((1 - a) * (d["lt"] - d["lb"]))
    w64 = torch.exp(a * (d["lt"] - d["lb"]))
    n = m.sum().item()
    assert st[M.RATIO_MAX].item() == pytest.approx(r64[m].max().item(), rel=1e-12)
    assert st[M.RATIO_MIN].item() == pytest.approx(r64[m].min().item(), rel=1e-12)
    assert st[M.RATIO_MEAN].item() == pytest.approx(r64[m].sum().item() / n, rel=1e-12)
    assert st[M.BEHAVE_W_MAX].item() == pytest.approx(w64[m].max().item(), rel=1e-12)
    # the clip acts on r64: count tokens it clips, written from the formula
    adv = d["adv"]
    clip_ref = m & (((adv > 0) & (r64 > 1.2)) | ((adv < 0) & (r64 < 0.8)))
    assert st[M.CLIP_COUNT].item() == int(clip_ref.sum()) > 0
    ref_loss, ref_grad, *_ = _ref(d["lt"], d["lb"], d["lb"] + a * (d["lt"] - d["lb"]), adv, m)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("schedule", ["inverse", "linear", "fixed"])
def test_inv3_no_staleness_equals_coupled_ppo_exactly(schedule):
    d = _batch(seed=3, max_stale=1)
    assert ((V - d["versions"][d["mask"]]) <= 1).all()
    for dt in (torch.float64, torch.float32):
        lb, lt, adv = d["lb"].to(dt), d["lt"].to(dt), d["adv"].to(dt)
        lp = approximate_prox_logp(lb, lt, d["versions"], V, "loglinear", schedule)
        loss_a, grad_a, st_a = _run(lt, lb, lp, adv, d["mask"], dual_clip=3.0)
        loss_c, grad_c, st_c = _run(lt, lb, lb, adv, d["mask"], dual_clip=3.0)   # coupled: prox = behave
        assert torch.equal(loss_a, loss_c) and torch.equal(grad_a, grad_c)
        assert st_a[M.BEHAVE_W_MAX].item() == 1.0 and st_c[M.BEHAVE_W_MAX].item() == 1.0
        # and coupled PPO itself is the textbook clipped objective
        ref_loss, ref_grad, *_ = _ref(d["lt"], d["lb"], d["lb"], d["adv"], d["mask"], dual=3.0)
        tol = 1e-12 if dt == torch.float64 else 1e-6
        assert loss_c.item() == pytest.approx(ref_loss, abs=tol)
        torch.testing.assert_close(grad_c.double(), ref_grad, atol=tol, rtol=0)


def test_inv4_gradient_inside_and_outside_clip_region():
    d = _batch(seed=4, spread=1.0)
    m = d["mask"]
    lp = approximate_prox_logp(d["lb"], d["lt"] - 0.1, d["versions"], V, "loglinear")
    kw = dict(eps_clip=0.2, eps_clip_high=0.28, dual_clip=2.0)
    loss, grad, st = _run(d["lt"], d["lb"], lp, d["adv"], m, **kw)
    n = m.sum().item()
    r = torch.exp(d["lt"] - lp)
    w = torch.exp(lp - d["lb"])
    ref_loss, _, clipped, dual, _ = _ref(d["lt"], d["lb"], lp, d["adv"], m, eps=0.2, eps_high=0.28, dual=2.0)
    inside = m & ~clipped & ~dual
    assert inside.any() and clipped.any() and dual.any()
    torch.testing.assert_close(grad[inside], (-w * r * d["adv"] / n)[inside], atol=1e-12, rtol=0)
    assert torch.all(grad[~inside] == 0)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12)
    assert st[M.CLIP_COUNT].item() == int(clipped.sum()) and st[M.DUAL_CLIP_COUNT].item() == int(dual.sum())
    assert st[M.CLIP_FRAC].item() == pytest.approx(int(clipped.sum()) / n)


def test_inv5_prompt_and_padding_contribute_exactly_zero():
    d = _batch(seed=5)
    m = d["mask"]
    lp = approximate_prox_logp(d["lb"], d["lt"], d["versions"], V, "loglinear")
    junk_lt = torch.where(m, d["lt"], torch.full_like(d["lt"], 1e4))        # exp overflows to inf
    junk_adv = torch.where(m, d["adv"], torch.full_like(d["adv"], float("inf")))
    junk_lb = torch.where(m, d["lb"], torch.full_like(d["lb"], -1e4))
    junk_lp = torch.where(m, lp, torch.full_like(lp, 50.0))
    loss, grad, st = _run(junk_lt, junk_lb, junk_lp, junk_adv, m, dual_clip=3.0)
    assert torch.all(grad[~m] == 0)
    ref_loss, ref_grad, *_ = _ref(d["lt"], d["lb"], lp, d["adv"], m, dual=3.0)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)
    assert all(torch.isfinite(v.double()).all() for v in st.values())


def test_inv6_no_gradient_through_prox_or_behaviour_weight():
    d = _batch(seed=6)
    m = d["mask"]
    x = d["lt"].clone().requires_grad_(True)
    lp = approximate_prox_logp(d["lb"], x, d["versions"], V, "loglinear")   # built from the trained logp
    assert not lp.requires_grad
    lp_leaf = lp.clone().requires_grad_(True)
    lb_leaf = d["lb"].clone().requires_grad_(True)
    adv_leaf = d["adv"].clone().requires_grad_(True)
    loss, _ = decoupled_ppo_loss(x, lb_leaf, lp_leaf, adv_leaf, m)
    loss.backward()
    assert lp_leaf.grad is None and lb_leaf.grad is None and adv_leaf.grad is None
    _, ref_grad, *_ = _ref(d["lt"], d["lb"], lp, d["adv"], m)   # prox and w treated as constants
    torch.testing.assert_close(x.grad, ref_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cap_mode", ["mask", "clamp"])
def test_inv7_micro_batch_split_invariance(cap_mode):
    d = _batch(seed=7, spread=1.0)
    m = d["mask"]
    lp = approximate_prox_logp(d["lb"], d["lt"] - 0.2, d["versions"], V, "loglinear")
    kw = dict(eps_clip=0.2, dual_clip=2.5, behave_weight_cap=1.5, behave_weight_cap_mode=cap_mode)
    full_loss, full_grad, full_st = _run(d["lt"], d["lb"], lp, d["adv"], m, **kw)
    n_global = int(m.sum())
    losses, grads, stats = [], [], []
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):   # uneven micro-batches
        lo, g, st = _run(d["lt"][rows], d["lb"][rows], lp[rows], d["adv"][rows], m[rows], num_tokens=n_global, **kw)
        losses.append(lo), grads.append(g), stats.append(st)
    assert sum(losses).item() == pytest.approx(full_loss.item(), abs=1e-12)
    torch.testing.assert_close(torch.cat(grads), full_grad, atol=1e-15, rtol=0)
    agg = aggregate_stats(stats)
    assert agg.keys() == full_st.keys()
    for k in full_st:
        torch.testing.assert_close(agg[k].double(), full_st[k].double(), atol=1e-12, rtol=0, msg=k)
    # and against the formula: the cap keeps N (counted before cap masking)
    ref_loss, _, clipped, _, capped = _ref(d["lt"], d["lb"], lp, d["adv"], m, dual=2.5, cap=1.5, cap_mode=cap_mode)
    assert capped.any()
    assert full_loss.item() == pytest.approx(ref_loss, abs=1e-12)
    assert agg[M.BEHAVE_W_CAPPED].item() == int(capped.sum())
    assert agg[M.NUM_TOKENS].item() == n_global


def test_behaviour_weight_always_applied_in_decoupled_mode():
    d = _batch(seed=8, spread=1.0)
    m = d["mask"]
    lp = approximate_prox_logp(d["lb"], d["lt"], d["versions"], V, "loglinear")
    loss, _, st = _run(d["lt"], d["lb"], lp, d["adv"], m)   # no cap, defaults
    ref_with_w, *_ = _ref(d["lt"], d["lb"], lp, d["adv"], m)
    # what a trainer that silently drops w would compute: the same objective with w = 1
    ref_without_w, *_ = _ref(d["lt"], lp, lp, d["adv"], m)
    assert loss.item() == pytest.approx(ref_with_w, abs=1e-12)
    assert abs(ref_with_w - ref_without_w) > 1e-3
    assert st[M.BEHAVE_W_MAX].item() > 1.0


# ---------------------------------------------------------------- alignment, stats helpers

def test_shift_aligns_versions_mask_and_logp_with_labels():
    # two packed sequences, per TOKEN: prompt tokens have version -1 / mask 0 / logp 0
    tokens = torch.tensor([[11, 12, 13, 14, 15, 21, 22, 23, 24]])
    is_resp = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    tok_ver = torch.tensor([[-1, -1, 3, 3, 4, -1, 2, 2, 2]])
    tok_lb = torch.where(is_resp, -tokens.double() / 100, torch.zeros(1, 9, dtype=torch.float64))
    labels = shift_to_positions(tokens, 0)
    mask, versions, lb = shift_to_positions(is_resp, False), shift_to_positions(tok_ver, -1), shift_to_positions(tok_lb, 0.0)
    for i in range(8):   # position i scores token i + 1: every tensor describes that same token
        assert labels[0, i] == tokens[0, i + 1]
        assert mask[0, i] == is_resp[0, i + 1] and versions[0, i] == tok_ver[0, i + 1] and lb[0, i] == tok_lb[0, i + 1]
    assert mask[0, -1] == False and versions[0, -1] == -1   # noqa: E712
    assert torch.equal(mask, versions >= 0)   # generated positions <=> a real version, also across the pack


def test_staleness_stats_match_formula_and_sum_across_micro_batches():
    d = _batch(seed=9)
    m, ver = d["mask"], d["versions"]
    st = staleness_stats(ver, V, m, hist_bins=4)
    stale = (V - ver[m]).tolist()
    assert st[M.STALENESS_MEAN].item() == pytest.approx(sum(stale) / len(stale), rel=1e-6)
    assert st[M.STALENESS_MAX].item() == max(stale)
    assert st[M.STALENESS_HIST].tolist() == [sum(1 for s in stale if min(s, 3) == k) for k in range(4)]
    assert st[M.ALPHA_MEAN].item() == pytest.approx(_alpha64(ver, V)[m].mean().item(), rel=1e-6)
    parts = [staleness_stats(ver[r], V, m[r], hist_bins=4, num_tokens=int(m.sum())) for r in (slice(0, 2), slice(2, 4))]
    agg = aggregate_stats(parts)
    for k in st:
        torch.testing.assert_close(agg[k].double(), st[k].double(), atol=1e-6, rtol=0)


def _errors64(rec, lb, lt, approx, m):
    """Per-token fp64 errors of one approximation, written out from the definitions (one list per name)."""
    out = {k: [] for k in ("abs", "sq", "rel", "prob_rel", "ratio_abs", "behave_w_abs")}
    for i in range(rec.numel()):
        if not m.view(-1)[i]:
            continue
        a, p, t, b = (float(x.reshape(-1)[i]) for x in (approx, rec, lt, lb))
        out["abs"].append(abs(a - p))
        out["sq"].append((a - p) ** 2)
        out["rel"].append(abs(a - p) / max(abs(p), 1e-8))
        out["prob_rel"].append(abs(math.exp(a - p) - 1))
        out["ratio_abs"].append(abs(math.exp(t - a) - math.exp(t - p)))
        out["behave_w_abs"].append(abs(math.exp(a - b) - math.exp(p - b)))
    return out


@pytest.mark.parametrize("split", [False, True])
def test_approx_error_stats_per_staleness_bucket_match_fp64(split):
    from megatron_a3po.loss import finalize_bucket_means

    d = _batch(seed=10, max_stale=6)
    m, ver = d["mask"], d["versions"]
    rec = d["lb"] + 0.4 * (d["lt"] - d["lb"]) + 0.01
    args = (d["lb"], d["lt"])
    if split:  # two micro-batches with the global token count, combined as the trainer does
        parts = [approx_error_stats(rec[r], d["lb"][r], d["lt"][r], ver[r], V, m[r], num_tokens=int(m.sum()))
                 for r in (slice(0, 1), slice(1, 4))]
        st = aggregate_stats(parts)
    else:
        st = approx_error_stats(rec, *args, ver, V, m)
    st = finalize_bucket_means({k: float(v) for k, v in st.items()})
    a = _alpha64(ver, V)
    stale = V - ver
    buckets = {"d1": stale <= 1, "d2": stale == 2, "d3": stale == 3, "d4+": stale >= 4}
    for method, approx in (("loglinear", d["lb"] + a * (d["lt"] - d["lb"])), ("behave", d["lb"]),
                           ("linear", torch.log((1 - a) * d["lb"].exp() + a * d["lt"].exp()))):
        for name, vals in _errors64(rec, d["lb"], d["lt"], approx, m).items():
            assert st[f"approx_err/{method}/{name}"] == pytest.approx(sum(vals) / len(vals), rel=1e-5)
        for b, bm in buckets.items():
            sel = m & bm
            if not sel.any():
                assert f"approx_err/{method}/abs/{b}" not in st
                continue
            for name, vals in _errors64(rec, d["lb"], d["lt"], approx, sel).items():
                assert st[f"approx_err/{method}/{name}/{b}"] == pytest.approx(sum(vals) / len(vals), rel=1e-5), (b, name)
    assert sum(1 for b, bm in buckets.items() if (m & bm).any()) == 4  # the batch fills every bucket


# ---------------------------------------------------------------- TP / DP (2 gloo processes)

VOCAB, VP = 29, 30


def _tp_dp_worker(rank, world):
    from megatron_a3po.ops import vocab_parallel_logprobs_entropy
    g = torch.Generator().manual_seed(11)
    d = _batch(seed=11)
    logits = 2 * torch.randn(B, L, VP, generator=g)
    labels = torch.randint(0, VOCAB, (B, L), generator=g)
    shard = logits[..., rank * VP // world:(rank + 1) * VP // world]
    logp, _ = vocab_parallel_logprobs_entropy(shard, labels, tp_group=dist.group.WORLD, temperature=0.9,
                                              vocab_size=VOCAB, chunk_size=7)
    lp = approximate_prox_logp(d["lb"], logp, d["versions"], V)
    tp_loss, _ = decoupled_ppo_loss(logp, d["lb"], lp, d["adv"], d["mask"])
    # the same group as a data-parallel group: rank r holds rows [2r, 2r+2) of the minibatch
    rows = slice(2 * rank, 2 * rank + 2)
    _, st = decoupled_ppo_loss(d["lt"][rows], d["lb"][rows], d["lb"][rows] + 0.1, d["adv"][rows],
                               d["mask"][rows], num_tokens=int(d["mask"].sum()))
    return tp_loss.item(), all_reduce_stats(st)


def test_tp2_loss_value_and_dp_stats_reduce():
    d = _batch(seed=11)
    g = torch.Generator().manual_seed(11)
    logits = (2 * torch.randn(B, L, VP, generator=g)).double()
    labels = torch.randint(0, VOCAB, (B, L), generator=g)
    logp64 = torch.log_softmax(logits[..., :VOCAB] / 0.9, -1).gather(-1, labels[..., None])[..., 0]
    a = _alpha64(d["versions"], V)
    ref_loss, *_ = _ref(logp64, d["lb"], d["lb"] + a * (logp64 - d["lb"]), d["adv"], d["mask"])
    outs = run_distributed(_tp_dp_worker, 2, timeout=120)
    m = d["mask"]
    r = torch.exp(d["lt"] - d["lb"] - 0.1)
    for tp_loss, st in outs:
        assert tp_loss == pytest.approx(ref_loss, abs=1e-5)
        assert st[M.RATIO_MAX].item() == pytest.approx(r[m].max().item(), rel=1e-12)
        assert st[M.RATIO_MIN].item() == pytest.approx(r[m].min().item(), rel=1e-12)
        assert st[M.RATIO_MEAN].item() == pytest.approx(r[m].mean().item(), rel=1e-12)
        assert st[M.NUM_TOKENS].item() == int(m.sum())


# ---------------------------------------------------------------- bad input

def test_bad_prox_inputs_name_the_argument():
    d = _batch()
    lb, lt, ver = d["lb"], d["lt"], d["versions"]
    with pytest.raises(ValueError, match="versions"):
        approximate_prox_logp(lb, lt, ver[:, :-1], V)
    with pytest.raises(ValueError, match="behave_logp contains NaN"):
        approximate_prox_logp(torch.where(d["mask"], lb, torch.full_like(lb, float("nan"))), lt, ver, V)
    with pytest.raises(ValueError, match="newer than current_version"):
        approximate_prox_logp(lb, lt, ver, V - 1)
    with pytest.raises(ValueError, match="versions must be >= -1"):
        approximate_prox_logp(lb, lt, torch.full_like(ver, -2), V)
    with pytest.raises(ValueError, match="'loglinearr'"):
        approximate_prox_logp(lb, lt, ver, V, "loglinearr")
    with pytest.raises(ValueError, match="'recompute'.*forward pass"):
        approximate_prox_logp(lb, lt, ver, V, "recompute")
    with pytest.raises(ValueError, match="alpha_schedule 'cosine'"):
        approximate_prox_logp(lb, lt, ver, V, alpha_schedule="cosine")
    stale = ver < V - 1   # alpha > 0 there (and at prompts alpha = 0, so junk there is harmless)
    for method, junk in (("loglinear", float("-inf")), ("loglinear", float("nan")), ("linear", float("nan"))):
        bad_lt = torch.where(stale, torch.full_like(lt, junk), lt)
        with pytest.raises(ValueError, match=f"method '{method}'.*NaN/Inf"):
            approximate_prox_logp(lb, bad_lt, ver, V, method)


@pytest.mark.parametrize("change, match", [
    (dict(adv=torch.zeros(B, L - 1, dtype=torch.float64)), "advantages shape"),
    (dict(mask=torch.ones(B, dtype=torch.bool)), "loss_mask shape"),
    (dict(lb=torch.full((B, L), float("nan"), dtype=torch.float64)), "behave_logp contains NaN"),
    (dict(lp=torch.full((B, L), float("inf"), dtype=torch.float64)), "prox_logp contains NaN/Inf"),
    (dict(kw=dict(eps_clip=0.0)), "eps_clip"),
    (dict(kw=dict(dual_clip=1.0)), "dual_clip"),
    (dict(kw=dict(behave_weight_cap=-1.0)), "behave_weight_cap"),
    (dict(kw=dict(behave_weight_cap=2.0, behave_weight_cap_mode="drop")), "behave_weight_cap_mode"),
])
def test_bad_loss_inputs_name_the_argument(change, match):
    d = _batch()
    args = dict(lt=d["lt"], lb=d["lb"], lp=d["lb"], adv=d["adv"], mask=d["mask"], kw={})
    args.update(change)
    with pytest.raises(ValueError, match=match):
        decoupled_ppo_loss(args["lt"], args["lb"], args["lp"], args["adv"], args["mask"], **args["kw"])


def test_alpha_schedule_parameters_reach_the_loss_from_the_recipe(monkeypatch):
    """loss.alpha_* of a recipe -> LossCfg.alpha_kwargs -> policy_forward_step -> the logged alpha mean."""
    from types import SimpleNamespace

    from megatron_a3po.loss import pipeline
    from megatron_a3po.config import LossCfg

    monkeypatch.setattr(pipeline, "_tp_group", lambda: None)
    d = _batch(seed=12, max_stale=4)
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(B, L, 7, generator=g)
    mb = SimpleNamespace(tokens=None, position_ids=None, labels=torch.randint(0, 7, (B, L), generator=g),
                         loss_mask=d["mask"].float(), behave_logp=d["lb"].float(), versions=d["versions"],
                         advantages=d["adv"].float(), prox_logp=None)
    n = int(d["mask"].sum())
    for lc, expect in ((LossCfg(alpha_schedule="fixed", alpha_fixed=0.3), lambda s: 0.3 * (s > 1)),
                       (LossCfg(alpha_schedule="linear", alpha_slope=0.4, alpha_cap=0.9),
                        lambda s: min(0.4 * (s - 1), 0.9) if s > 1 else 0.0)):
        fwd = pipeline.policy_forward_step(mode="loglinear", current_version=V, num_tokens_global=n,
                                           temperature=1.0, vocab_size=7, alpha_schedule=lc.alpha_schedule,
                                           schedule_kwargs=lc.alpha_kwargs())
        _, loss_func = fwd(iter([mb]), lambda *a: logits)
        _, _, st = loss_func(logits)
        stale = (V - d["versions"][d["mask"]]).tolist()
        assert st[M.ALPHA_MEAN].item() == pytest.approx(sum(expect(s) for s in stale) / n, rel=1e-6)
