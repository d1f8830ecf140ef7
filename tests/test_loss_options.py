"""The loss options of docs/algorithm.md (aggregation, rollout correction, GSPO, CISPO, KL, mismatch
metrics), each against the fp64 reference in loss_reference.py or a formula written here."""

import math

import pytest
import torch

from loss_reference import objective
from test_loss import B, L, V, _alpha64, _batch

from megatron_a3po import metrics as M
from megatron_a3po.loss import aggregate_stats, approximate_prox_logp, decoupled_ppo_loss
from megatron_a3po.loss.aggregate import AGG_MODES, count_sequences, default_seq_ids, token_scale
from megatron_a3po.loss.correction import Correction, apply_correction, mismatch_stats
from megatron_a3po.loss.kl import kl_estimate
from megatron_a3po.loss.stats import finalize_bucket_means

INF = math.inf


def _data(seed=20, spread=0.6):
    d = _batch(seed=seed, max_stale=4, spread=spread)
    # uneven response lengths: rows end at different positions (a sequence = a row)
    for b, end in enumerate((L - 2, L - 5, L - 3, L - 7)):
        d["mask"][b, end:] = False
    m = d["mask"]
    d["versions"] = torch.where(m, d["versions"], torch.full_like(d["versions"], -1))
    d["lp"] = approximate_prox_logp(d["lb"], d["lt"] + 0.1, d["versions"], V, "loglinear")
    g = torch.Generator().manual_seed(seed + 1)
    d["ref"] = torch.where(m, d["lb"] + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64), d["lb"])
    # GRPO: one advantage per sequence
    d["adv"] = torch.where(m, torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, L), torch.zeros(B, L, dtype=torch.float64))
    return d


def _seqs(d, x, rows=range(B)):
    out = []
    for b in rows:
        idx = d["mask"][b].nonzero().flatten().tolist()
        out.append(dict(x=[x[b, j] for j in idx], lb=d["lb"][b, idx], lp=d["lp"][b, idx], A=float(d["adv"][b, idx[0]]),
                        ref=d["ref"][b, idx]))
    return out


def _ours(d, rows=slice(None), n_tok=None, n_seq=None, agg="token-mean", C=None, **kw):
    m = d["mask"][rows]
    x = d["lt"][rows].clone().requires_grad_(True)
    ids = default_seq_ids(m)
    n_tok = int(m.sum()) if n_tok is None else n_tok
    n_seq = count_sequences(m, ids) if n_seq is None else n_seq
    scale = token_scale(m, ids, agg, num_seqs=n_seq, norm_constant=C, dtype=torch.float64)
    if kw.get("kl_coef"):
        kw["ref_logp"] = d["ref"][rows]
    loss, st = decoupled_ppo_loss(x, d["lb"][rows], d["lp"][rows], d["adv"][rows], m, num_tokens=n_tok,
                                  num_seqs=n_seq, seq_ids=ids, token_scale=scale, **kw)
    loss.backward()
    return loss.detach(), x.grad, st


def _reference(d, **opts):
    x = d["lt"].clone().requires_grad_(True)
    m = d["mask"]
    loss = objective(_seqs(d, x), N=int(m.sum()), NS=B, **opts)
    loss.backward()
    return float(loss), torch.where(m, x.grad, torch.zeros_like(x.grad))


# (our kwargs, reference kwargs): every option alone and in combinations
CASES = {
    "agg-seq-mean-token-mean": (dict(agg="seq-mean-token-mean"), dict(agg="seq-mean-token-mean")),
    "agg-seq-mean-token-sum": (dict(agg="seq-mean-token-sum", dual_clip=2.0), dict(agg="seq-mean-token-sum", dual=2.0)),
    "agg-dr-grpo": (dict(agg="seq-mean-token-sum-norm", C=16.0), dict(agg="seq-mean-token-sum-norm", C=16.0)),
    "tis-token": (dict(correction=Correction(tis_level="token", tis_cap=1.1)), dict(tis=("token", 1.1))),
    "tis-sequence": (dict(correction=Correction(tis_level="sequence", tis_cap=0.5)), dict(tis=("sequence", 0.5))),
    "tis-geometric": (dict(correction=Correction(tis_level="geometric", tis_cap=0.88)), dict(tis=("geometric", 0.88))),
    "mis-token-prox": (dict(correction=Correction(mis_level="token", mis_high=1.2)), dict(mis=("token", "prox", 0, 1.2))),
    "icepop-theta": (dict(correction=Correction(mis_level="token", mis_ratio="theta", mis_low=0.5, mis_high=2.0)),
                     dict(mis=("token", "theta", 0.5, 2.0))),
    "mis-sequence": (dict(correction=Correction(mis_level="sequence", mis_ratio="theta", mis_low=0.2, mis_high=5.0)),
                     dict(mis=("sequence", "theta", 0.2, 5.0))),
    "mis-geometric+tis-token": (
        dict(correction=Correction(mis_level="geometric", mis_low=0.8, mis_high=0.9, tis_level="token", tis_cap=0.95)),
        dict(mis=("geometric", "prox", 0.8, 0.9), tis=("token", 0.95))),
    "gspo": (dict(pg_variant="gspo", eps_clip=0.05, agg="seq-mean-token-mean"),
             dict(variant="gspo", eps=0.05, agg="seq-mean-token-mean")),
    "cispo": (dict(pg_variant="cispo", eps_clip=1.0, eps_clip_high=0.2), dict(variant="cispo", eps=1.0, eps_high=0.2)),
    "kl-k1": (dict(kl_coef=0.1, kl_estimator="k1"), dict(kl=(0.1, "k1"))),
    "kl-k2+seq-sum": (dict(kl_coef=0.3, kl_estimator="k2", agg="seq-mean-token-sum"),
                      dict(kl=(0.3, "k2"), agg="seq-mean-token-sum")),
    "kl-k3+tis-seq+gspo": (
        dict(kl_coef=0.2, kl_estimator="k3", pg_variant="gspo", correction=Correction(tis_level="sequence", tis_cap=0.5)),
        dict(kl=(0.2, "k3"), variant="gspo", tis=("sequence", 0.5))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_option_loss_and_gradient_match_fp64(name):
    ours, ref = CASES[name]
    d = _data()
    loss, grad, st = _ours(d, **ours)
    ref_loss, ref_grad = _reference(d, **ref)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12, rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-10)
    # the case exercises its option: something truncated / masked, but not everything
    for key in (M.CORR_TIS_TOKEN_FRAC, M.CORR_MIS_TOKEN_FRAC):
        if key in st:
            assert 0 < st[key].item() < 1, (key, st[key].item())
    if "kl_coef" in ours:
        assert st[M.KL_REF].item() != 0


def test_cap_inf_and_keep_everything_mask_are_no_ops_bit_for_bit():
    d = _data(seed=21)
    base_loss, base_grad, _ = _ours(d)
    noops = [Correction(tis_level="token", tis_cap=INF)]
    noops += [Correction(mis_level=lvl, mis_ratio=r, mis_low=0.0, mis_high=INF)
              for lvl in ("token", "sequence", "geometric") for r in ("prox", "theta")]
    for corr in noops:
        loss, grad, st = _ours(d, correction=corr)
        assert torch.equal(loss, base_loss) and torch.equal(grad, base_grad), corr
        assert st.get(M.CORR_TIS_TOKEN_FRAC, torch.tensor(0.0)).item() == 0
        assert st.get(M.CORR_MIS_TOKEN_FRAC, torch.tensor(0.0)).item() == 0
    # and sequence-level TIS with an infinite cap is the untruncated sequence weight prod_t w_t
    loss, _, _ = _ours(d, correction=Correction(tis_level="sequence", tis_cap=INF))
    ref_loss, _ = _reference(d, tis=("sequence", INF))
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12, rel=1e-12)


def test_truncation_bias_shrinks_as_documented():
    """Known mismatch: actions a ~ pi_b of a 6-way categorical, target pi_t, f(a) a reward. The truncated
    estimator E_b[min(rho, C) f] has bias -E_b[(rho - C)_+ f] (docs/algorithm.md), which shrinks to 0 as C
    grows to max rho; masking (drop rho > C) has bias -E_b[rho 1(rho > C) f], also 0 past max rho. The
    weights come from apply_correction; the expectations are exact sums over the 6 actions."""
    pb = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05], dtype=torch.float64)
    pt = torch.tensor([0.10, 0.15, 0.20, 0.20, 0.15, 0.20], dtype=torch.float64)
    f = torch.tensor([0.0, 1.0, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    rho = pt / pb
    truth = float((pt * f).sum())
    mask = torch.ones(6, dtype=torch.bool)
    log_w = torch.log(rho)
    biases = {"tis": [], "mis": []}
    for cap in (1.0, 1.5, 2.0, 3.0, float(rho.max()) + 1e-9, INF):
        for kind in ("tis", "mis"):
            corr = Correction(tis_level="token", tis_cap=cap) if kind == "tis" else Correction(mis_level="token", mis_high=cap)
            w, keep, _ = apply_correction(corr, rho.clone(), log_w, log_w, mask, mask, torch.zeros(6, dtype=torch.long),
                                          num_tokens=torch.tensor(6.0, dtype=torch.float64), num_seqs=1)
            est = float((pb * torch.where(keep, w, torch.zeros_like(w)) * f).sum())
            over = (rho - cap).clamp(min=0) if math.isfinite(cap) else torch.zeros(6, dtype=torch.float64)
            ref_bias = -float((pb * over * f).sum()) if kind == "tis" else -float((pb * rho * (rho > cap) * f).sum())
            assert est - truth == pytest.approx(ref_bias, abs=1e-12)
            biases[kind].append(abs(est - truth))
    for kind, b in biases.items():
        assert all(x >= y for x, y in zip(b, b[1:])) and b[0] > 0.1 and b[-2] == b[-1] == pytest.approx(0, abs=1e-12), (kind, b)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregation_and_sequence_options_do_not_depend_on_the_split(agg):
    d = _data(seed=22, spread=1.0)
    kw = dict(agg=agg, C=12.0, pg_variant="gspo" if agg == "seq-mean-token-mean" else "ppo", kl_coef=0.1,
              correction=Correction(tis_level="geometric", tis_cap=0.99, mis_level="sequence", mis_ratio="theta",
                                    mis_low=0.6, mis_high=2.0))
    full_loss, full_grad, full_st = _ours(d, **kw)
    n_tok, n_seq = int(d["mask"].sum()), B
    parts = [_ours(d, rows=r, n_tok=n_tok, n_seq=n_seq, **kw) for r in (slice(0, 1), slice(1, 3), slice(3, 4))]
    assert sum(p[0] for p in parts).item() == pytest.approx(full_loss.item(), abs=1e-14)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), full_grad, atol=1e-15, rtol=0)
    agg_st = aggregate_stats(p[2] for p in parts)
    for k in full_st:
        torch.testing.assert_close(agg_st[k].double(), full_st[k].double(), atol=1e-12, rtol=0, msg=k)
    assert 0 < full_st[M.CORR_MIS_SEQ_FRAC].item() < 1 and full_st[M.CORR_MIS_SEQ_FRAC].item() * B == pytest.approx(
        round(full_st[M.CORR_MIS_SEQ_FRAC].item() * B))


def test_gspo_is_the_sequence_level_objective():
    """GSPO (Zheng et al. 2025): J = mean_i min(s_i A_i, clip(s_i) A_i), s_i = (pi/pi_old)^(1/|y_i|).
    With seq-mean-token-mean, the GSPO-token loss has J's value and gradient."""
    d = _data(seed=23, spread=0.3)
    d["lp"] = d["lb"]   # pi_old = the behaviour policy: w = 1, as in the paper's setting
    loss, grad, _ = _ours(d, pg_variant="gspo", eps_clip=0.02, agg="seq-mean-token-mean")
    x = d["lt"].clone().requires_grad_(True)
    J = torch.zeros((), dtype=torch.float64)
    n_clipped = 0
    for b in range(B):
        m = d["mask"][b]
        s = torch.exp((x[b][m] - d["lp"][b][m]).mean())
        A = d["adv"][b][m][0]
        J = J + torch.minimum(s * A, s.clamp(0.98, 1.02) * A) / B
        n_clipped += int(torch.minimum(s * A, s.clamp(0.98, 1.02) * A) != s * A)
    (-J).backward()
    assert 0 < n_clipped < B
    assert loss.item() == pytest.approx(-J.item(), abs=1e-12)
    torch.testing.assert_close(grad, torch.where(d["mask"], x.grad, torch.zeros_like(x.grad)), atol=1e-12, rtol=0)


def test_cispo_gradient_is_the_clipped_weight_everywhere():
    d = _data(seed=24, spread=1.0)
    loss, grad, st = _ours(d, pg_variant="cispo", eps_clip=0.2, eps_clip_high=0.2)
    m = d["mask"]
    r = torch.exp(d["lt"] - d["lp"])
    w = torch.exp(d["lp"] - d["lb"])
    ref = torch.where(m, -w * r.clamp(0.8, 1.2) * d["adv"] / int(m.sum()), torch.zeros_like(r))
    torch.testing.assert_close(grad, ref, atol=1e-14, rtol=0)
    outside = m & ((r < 0.8) | (r > 1.2))
    assert outside.any() and (grad[outside] != 0).all()   # PPO's clip would zero some of these
    assert st[M.CLIP_COUNT].item() == int(outside.sum())


def test_kl_estimators_values_gradients_and_expectations():
    g = torch.Generator().manual_seed(25)
    x = torch.randn(20, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.randn(20, generator=g, dtype=torch.float64)
    for est, f, df in (("k1", lambda a, b: a - b, lambda a, b: 1.0),
                       ("k2", lambda a, b: 0.5 * (a - b) ** 2, lambda a, b: a - b),
                       ("k3", lambda a, b: math.exp(b - a) - 1 - (b - a), lambda a, b: 1 - math.exp(b - a))):
        k = kl_estimate(x, ref, est)
        (gx,) = torch.autograd.grad(k.sum(), x)
        for i in range(20):
            a, b = float(x[i]), float(ref[i])
            assert float(k[i]) == pytest.approx(f(a, b), abs=1e-12)
            assert float(gx[i]) == pytest.approx(df(a, b), abs=1e-12)
    # on samples from p itself, E_p[k1] = E_p[k3] = KL(p || q) exactly (enumerated categorical)
    p = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    kl = float((p * (p.log() - q.log())).sum())
    for est in ("k1", "k3"):
        assert float((p * kl_estimate(p.log(), q.log(), est)).sum()) == pytest.approx(kl, abs=1e-12)
    assert float((p * kl_estimate(p.log(), q.log(), "k3")).min()) >= 0


@pytest.mark.parametrize("split", [False, True])
def test_mismatch_metrics_match_fp64_per_bucket(split):
    d = _data(seed=26)
    m, ver = d["mask"], d["versions"]
    ver = torch.where(m & (torch.arange(L) % 5 == 0), torch.full_like(ver, V), ver)   # some d = 0 tokens
    eng, tr = d["lb"], d["lt"]
    if split:
        st = aggregate_stats(mismatch_stats(eng[r], tr[r], ver[r], V, m[r], num_tokens=int(m.sum()))
                             for r in (slice(0, 1), slice(1, 4)))
    else:
        st = mismatch_stats(eng, tr, ver, V, m)
    st = finalize_bucket_means({k: float(v) for k, v in st.items()})
    stale = V - ver
    for bucket, sel in (("", m), ("/d0", m & (stale <= 0)), ("/d1", m & (stale == 1)), ("/d2", m & (stale == 2)),
                        ("/d3+", m & (stale >= 3))):
        k1 = [float(eng.view(-1)[i] - tr.view(-1)[i]) for i in range(B * L) if sel.view(-1)[i]]
        k3 = [math.exp(-v) - 1 + v for v in k1]   # rho = pi_t / pi_e = exp(-k1)
        assert k1, bucket
        assert st[M.MISMATCH_K1 + bucket] == pytest.approx(sum(k1) / len(k1), rel=1e-6)
        assert st[M.MISMATCH_K3 + bucket] == pytest.approx(sum(k3) / len(k3), rel=1e-6)


def test_behave_weight_stats_stay_the_behaviour_weight_and_correction_stats_are_shares():
    d = _data(seed=27)
    _, _, st = _ours(d, correction=Correction(tis_level="token", tis_cap=1.1, mis_level="token", mis_ratio="theta",
                                              mis_low=0.6, mis_high=1.6))
    m = d["mask"]
    w = torch.exp(d["lp"] - d["lb"])
    rt = torch.exp(d["lt"] - d["lb"])
    n = int(m.sum())
    keep = m & (rt >= 0.6) & (rt <= 1.6)
    assert st[M.BEHAVE_W_MAX].item() == pytest.approx(w[m].max().item())
    assert st[M.CORR_MIS_TOKEN_FRAC].item() == pytest.approx(int((m & ~keep).sum()) / n)
    assert st[M.CORR_TIS_TOKEN_FRAC].item() == pytest.approx(int((keep & (w > 1.1)).sum()) / n)
    assert st[M.CORR_IS_W_MAX].item() == pytest.approx(min(1.1, w[keep].max().item()))
    assert st[M.CORR_IS_W_MEAN].item() == pytest.approx(w[keep].clamp(max=1.1).sum().item() / n)


def test_bad_option_values_name_the_setting():
    from megatron_a3po.config import LossCfg

    for kw, match in ((dict(tis_level="tok"), "tis_level"), (dict(mis_ratio="x"), "mis_ratio"),
                      (dict(tis_cap=0.0), "tis_cap"), (dict(mis_low=2.0, mis_high=1.0), "mis_low")):
        with pytest.raises(ValueError, match=match):
            Correction(**kw)
    d = _data()
    with pytest.raises(ValueError, match="pg_variant"):
        _ours(d, pg_variant="trpo")
    with pytest.raises(ValueError, match="dual_clip does not apply"):
        _ours(d, pg_variant="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match="needs ref_logp"):
        decoupled_ppo_loss(d["lt"], d["lb"], d["lp"], d["adv"], d["mask"], kl_coef=0.1)
    with pytest.raises(ValueError, match="agg_norm_constant"):
        LossCfg(agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="mis_high"):
        LossCfg(mis_low=1.0, mis_high=0.5)
    with pytest.raises(ValueError, match="cispo"):
        LossCfg(pg_variant="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match="agg_mode"):
        token_scale(d["mask"], default_seq_ids(d["mask"]), "sum", num_seqs=1)


def test_prox_ratio_is_one_for_fresh_tokens_under_the_approximation():
    """Under A-3PO's approximation a token of staleness <= 1 has pi_prox = pi_behav (w = 1): truncating or
    masking the prox ratio cannot touch it; the theta ratio can (docs/algorithm.md, "Rollout correction")."""
    d = _data(seed=28)
    m = d["mask"]
    ver = torch.where(m, torch.full_like(d["versions"], V - 1), d["versions"])
    lp = approximate_prox_logp(d["lb"], d["lt"], ver, V, "loglinear")
    assert _alpha64(ver, V)[m].eq(0).all() and torch.equal(lp[m], d["lb"][m])
    d = dict(d, lp=lp)
    base_loss, base_grad, _ = _ours(d)
    for corr in (Correction(tis_level="token", tis_cap=1.0), Correction(tis_level="sequence", tis_cap=1.0),
                 Correction(mis_level="token", mis_low=0.99, mis_high=1.01)):
        loss, grad, st = _ours(d, correction=corr)
        assert loss.item() == base_loss.item() and torch.equal(grad, base_grad), corr
    _, _, st = _ours(d, correction=Correction(mis_level="token", mis_ratio="theta", mis_high=1.2))
    assert st[M.CORR_MIS_TOKEN_FRAC].item() > 0
