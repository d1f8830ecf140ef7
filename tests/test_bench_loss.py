"""bench/loss.py times four ways of computing per-token log-probs (and entropy) under one workload: each
must compute the same thing, checked against fp64 log-softmax written here (values and gradients), or
the timings compare different work. Its paired runner's ratios are recomputed from its raw times. No
timing asserts."""

import pytest
import torch
from test_trainer_steps import dist1  # noqa: F401 - Megatron's CE needs a TP group

from bench.loss import VARIANTS, _variant_fn, run_paired, run_variant


def _reference(x: torch.Tensor, labels: torch.Tensor):
    z = x.detach().double().requires_grad_(True)
    logsm = torch.log_softmax(z, dim=-1)
    logp = logsm.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    return z, logp, ent


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_computes_fp64_logprobs_entropy_and_gradients(dist1, name):
    g = torch.Generator().manual_seed(0)
    x0 = 3 * torch.randn(6, 50, generator=g)
    labels = torch.randint(0, 50, (6,), generator=g)
    x = x0.clone().requires_grad_(True)  # Megatron's CE overwrites its input
    logp, ent = _variant_fn(name, 16)(x, labels)
    z, ref_logp, ref_ent = _reference(x0, labels)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    if ent is not None:
        torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    (logp.sum() if ent is None else logp.sum() + ent.sum()).backward()
    (ref_logp.sum() if ent is None else ref_logp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(x.grad.double(), z.grad, rtol=1e-4, atol=1e-5)


def test_runners_report_what_they_timed():
    row = run_variant("ours", tokens=8, vocab=300, reps=2, chunk=4)
    assert (row["variant"], row["tokens"], row["vocab"], row["chunk_size"]) == ("ours", 8, 300, 4)
    assert row["seconds"] == sorted(row["all_seconds"])[1] and isinstance(row["peak_extra_bytes"], int)
    res = run_paired("ours", "naive", tokens=8, vocab=300, reps=3, chunk=4)
    t = res["all_seconds"]
    assert len(t["ours"]) == len(t["naive"]) == 3  # the warm-up pair dropped
    assert res["ratios"] == sorted(a / b for a, b in zip(t["ours"], t["naive"]))
    assert res["ratio_median"] == res["ratios"][1]
