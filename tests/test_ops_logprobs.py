"""vocab_parallel_logprobs_entropy against a plain fp64 log_softmax on the full (unpadded) vocab."""

import pytest
import torch
import torch.distributed as dist

from megatron_a3po.ops import vocab_parallel_logprobs_entropy
from megatron_a3po.platform.procs import run_distributed

V_REAL = 37          # real vocab, odd: not divisible by TP=2
V_PAD = 40           # padded vocab (Megatron pads to a multiple of TP x something): 3 padded columns
N_TOK = 11           # tokens, > chunk size
CHUNK = 4
TEMP = 0.7


def _data(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3.0 * torch.randn(N_TOK, V_PAD, generator=g)).to(dtype)
    x[:, V_REAL:] = 0.0                         # padded columns hold logit 0, as Megatron produces
    labels = torch.randint(0, V_REAL, (N_TOK,), generator=g)
    labels[0], labels[1] = 0, V_REAL - 1        # first and last real ids, owned by different TP ranks
    g_logp = torch.randn(N_TOK, generator=g, dtype=torch.float64)
    g_ent = torch.randn(N_TOK, generator=g, dtype=torch.float64)
    return x, labels, g_logp, g_ent


def _reference(x, labels, g_logp, g_ent, temperature):
    """fp64 log-probs, entropy, and d(g_logp.logp + g_ent.H)/dx over the padded width (padding grad = 0)."""
    xd = x.detach().to(torch.float64).requires_grad_(True)
    logsm = torch.log_softmax(xd[:, :V_REAL] / temperature, dim=-1)
    logp = logsm.gather(-1, labels[:, None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    ((g_logp * logp).sum() + (g_ent * ent).sum()).backward()
    return logp.detach(), ent.detach(), xd.grad


def _ours(x_shard, labels, g_logp, g_ent, temperature, tp_group=None):
    x = x_shard.clone().requires_grad_(True)
    before = x.detach().clone()
    logp, ent = vocab_parallel_logprobs_entropy(x, labels, tp_group=tp_group, temperature=temperature,
                                                vocab_size=V_REAL, chunk_size=CHUNK)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    (logp * g_logp.float()).sum().add((ent * g_ent.float()).sum()).backward()
    assert torch.equal(x.detach(), before), "input logits were modified"
    assert x.grad.dtype == x.dtype
    return logp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("temperature", [1.0, TEMP])
def test_tp1_fp32_matches_fp64_reference(temperature):
    x, labels, gl, ge = _data()
    ref_lp, ref_h, ref_g = _reference(x, labels, gl, ge, temperature)
    lp, h, g = _ours(x, labels, gl, ge, temperature)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(h.double(), ref_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(g.double(), ref_g, atol=1e-5, rtol=0)
    assert torch.all(g[:, V_REAL:] == 0)


def test_tp1_bf16_within_bf16_tolerance():
    x, labels, gl, ge = _data(torch.bfloat16)
    ref_lp, ref_h, ref_g = _reference(x, labels, gl, ge, TEMP)   # reference on the same bf16 values
    lp, h, g = _ours(x, labels, gl, ge, TEMP)
    # internal math is fp32, so the outputs are fp32-accurate; only the gradient is rounded to bf16
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(h.double(), ref_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(g.double(), ref_g, atol=1e-2, rtol=1e-2)


def test_leading_dims_and_unused_entropy_gradient():
    x, labels, gl, _ = _data()
    ref_lp, _, ref_g = _reference(x, labels, gl, torch.zeros_like(gl), TEMP)
    x3 = x.reshape(1, N_TOK, V_PAD).clone().requires_grad_(True)
    lp, _ = vocab_parallel_logprobs_entropy(x3, labels.reshape(1, N_TOK), temperature=TEMP, vocab_size=V_REAL,
                                            chunk_size=CHUNK)
    assert lp.shape == (1, N_TOK)
    (lp[0] * gl.float()).sum().backward()     # entropy output unused: its gradient is treated as 0
    torch.testing.assert_close(x3.grad[0].double(), ref_g, atol=1e-5, rtol=0)


def _tp2_worker(rank, world, temperature):
    x, labels, gl, ge = _data()
    shard = x[:, rank * V_PAD // world:(rank + 1) * V_PAD // world]
    lp, h, g = _ours(shard, labels, gl, ge, temperature, tp_group=dist.group.WORLD)
    return lp, h, g


def test_tp2_fp32_matches_fp64_reference():
    x, labels, gl, ge = _data()
    ref_lp, ref_h, ref_g = _reference(x, labels, gl, ge, TEMP)
    outs = run_distributed(_tp2_worker, 2, TEMP, timeout=120)
    for lp, h, _ in outs:                       # every rank gets the full per-token result
        torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(h.double(), ref_h, atol=1e-5, rtol=0)
    g = torch.cat([o[2] for o in outs], dim=-1)   # shards side by side = the full padded width
    torch.testing.assert_close(g.double(), ref_g, atol=1e-5, rtol=0)
    assert torch.all(g[:, V_REAL:] == 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=torch.zeros(3, dtype=torch.long)), "labels shape"),
    (dict(labels=torch.full((N_TOK,), V_REAL)), "labels must lie in"),
    (dict(labels=torch.full((N_TOK,), -1)), "labels must lie in"),
    (dict(labels=torch.zeros(N_TOK)), "labels must be an integer"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(vocab_size=V_PAD + 1), "vocab_size"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_inputs_name_the_argument(kwargs, match):
    x, labels, _, _ = _data()
    args = dict(labels=labels, temperature=1.0, vocab_size=V_REAL, chunk_size=CHUNK)
    args.update(kwargs)
    lab = args.pop("labels")
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs_entropy(x, lab, **args)


@pytest.mark.parametrize("use_entropy", [True, False])
def test_tp1_no_padding_fp32(use_entropy):
    """No padded columns: the fp32 backward writes straight into the gradient buffer."""
    g = torch.Generator().manual_seed(3)
    x = 3.0 * torch.randn(N_TOK, V_PAD, generator=g)
    labels = torch.randint(0, V_PAD, (N_TOK,), generator=g)
    gl = torch.randn(N_TOK, generator=g, dtype=torch.float64)
    ge = torch.randn(N_TOK, generator=g, dtype=torch.float64) if use_entropy else torch.zeros(N_TOK, dtype=torch.float64)
    xd = x.double().requires_grad_(True)
    logsm = torch.log_softmax(xd / TEMP, dim=-1)
    ref_lp = logsm.gather(-1, labels[:, None]).squeeze(-1)
    ref_h = -(logsm.exp() * logsm).sum(-1)
    ((gl * ref_lp).sum() + (ge * ref_h).sum()).backward()
    xx = x.clone().requires_grad_(True)
    lp, h = vocab_parallel_logprobs_entropy(xx, labels, temperature=TEMP, chunk_size=CHUNK)
    ((lp * gl.float()).sum() + (h * ge.float()).sum()).backward()
    assert torch.equal(xx.detach(), x)
    torch.testing.assert_close(lp.double(), ref_lp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.double(), ref_h.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(xx.grad.double(), xd.grad, atol=1e-5, rtol=0)
