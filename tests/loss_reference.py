"""An fp64 reference of the loss options of docs/algorithm.md, written sequence by sequence and token by
token from the formulas (not from megatron_a3po.loss): aggregation, TIS / MIS / ICEPOP, GSPO, CISPO,
KL to a reference policy, the entropy bonus. Autograd on fp64 scalars gives the reference gradients."""

import math

import torch


def _level(vals, level):
    """A sequence's per-token log-ratios -> the log-ratio each token is judged by."""
    if level == "token":
        return list(vals)
    tot = sum(vals)
    return [tot] * len(vals) if level == "sequence" else [tot / len(vals)] * len(vals)


def objective(seqs, *, N, NS, eps=0.2, eps_high=None, dual=None, variant="ppo", tis=None, mis=None,
              agg="token-mean", C=None, kl=None, ent_coef=0.0):
    """The minibatch loss (an fp64 scalar with autograd) of ``seqs``: dicts with per-token lists / 1-D
    tensors ``x`` (trained log-prob, with gradient), ``lb`` (behaviour), ``lp`` (proximal), ``A`` (the
    sequence's advantage), optional ``ref`` (reference log-prob) and ``ent`` (entropy, with gradient).
    ``N`` / ``NS``: the minibatch's token / sequence counts. ``tis = (level, cap)``,
    ``mis = (level, ratio "prox"|"theta", lo, hi)``, ``kl = (coef, "k1"|"k2"|"k3")``."""
    eps_high = eps if eps_high is None else eps_high
    lo_clip, hi_clip = 1.0 - eps, 1.0 + eps_high
    total = torch.zeros((), dtype=torch.float64)
    for s in seqs:
        x, T, A = s["x"], len(s["lb"]), float(s["A"])
        lb = [float(v) for v in s["lb"]]
        lp = [float(v) for v in s["lp"]]
        xd = [float(x[j]) for j in range(T)]
        coef = {"token-mean": 1.0 / N, "seq-mean-token-mean": 1.0 / (NS * T), "seq-mean-token-sum": 1.0 / NS,
                "seq-mean-token-sum-norm": 1.0 / (NS * C) if C else None}[agg]
        keep = [True] * T
        if mis is not None:
            level, which, lo, hi = mis
            logs = [lp[j] - lb[j] if which == "prox" else xd[j] - lb[j] for j in range(T)]
            keep = [lo <= math.exp(v) <= hi for v in _level(logs, level)]
        w = [math.exp(lp[j] - lb[j]) for j in range(T)]
        if tis is not None:
            level, cap = tis
            if level == "token":
                w = [min(v, cap) for v in w]
            else:
                w = [min(math.exp(v), cap) for v in _level([lp[j] - lb[j] for j in range(T)], level)]
        s_seq = math.exp(sum(xd[j] - lp[j] for j in range(T)) / T)
        for j in range(T):
            xj = x[j]
            if variant == "gspo":    # value s_seq, gradient s_seq * d x_j
                ratio = s_seq * torch.exp(xj - xj.detach())
            else:
                ratio = torch.exp(xj - lp[j])
            if variant == "cispo":
                pg = -A * min(max(math.exp(xd[j] - lp[j]), lo_clip), hi_clip) * xj
            else:
                pg = torch.maximum(-A * ratio, -A * ratio.clamp(lo_clip, hi_clip))
                if dual is not None and A < 0:
                    pg = torch.minimum(pg, torch.tensor(dual * abs(A), dtype=torch.float64))
            if keep[j]:
                total = total + coef * w[j] * pg
            if kl is not None:
                k_coef, est = kl
                d = float(s["ref"][j]) - xj          # log(pi_ref / pi_theta)
                k = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.exp(d) - 1 - d}[est]
                total = total + k_coef * coef * k
            if ent_coef:
                total = total - ent_coef * coef * s["ent"][j]
    return total
