"""Packing and alignment checks against brute-force expectations written here."""
import random

import pytest
import torch

from megatron_a3po.trainer.batch import TrainSample, collate
from megatron_a3po.trainer.packing import pack_microbatches, split_minibatches


@pytest.mark.parametrize("seed", range(5))
def test_every_sample_once_and_under_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(3, 60) for _ in range(rng.randint(1, 80))]
    budget = 128
    plans = pack_microbatches(lengths, budget)
    seen = sorted(i for p in plans for i in p.indices)
    assert seen == list(range(len(lengths)))
    for p in plans:
        assert p.seq_len == max(lengths[i] for i in p.indices)
        assert len(p.indices) * p.seq_len <= budget
    # no more blocks than a naive one-sample-per-block split, and padding no worse than ~50% of
    # real tokens (sorted blocks hold similar lengths)
    assert len(plans) <= len(lengths)
    real = sum(lengths)
    padded = sum(p.padded_tokens for p in plans)
    assert padded <= 1.5 * real + budget


def test_equal_lengths_fill_blocks_exactly():
    plans = pack_microbatches([10] * 16, 40)
    assert len(plans) == 4 and all(len(p.indices) == 4 for p in plans)


def test_sample_over_budget_is_named():
    with pytest.raises(ValueError, match=r"sample 1 has 50 tokens > trainer.max_tokens_per_mb=40"):
        pack_microbatches([10, 50], 40)


def test_minibatches_keep_groups_whole():
    mbs = split_minibatches(24, 4, group_size=3)
    assert [len(m) for m in mbs] == [6, 6, 6, 6]
    assert sorted(i for m in mbs for i in m) == list(range(24))
    with pytest.raises(ValueError, match="ppo_n_minibatches=9"):
        split_minibatches(24, 9, group_size=3)


def test_collate_shift_alignment():
    s = TrainSample(prompt_ids=[5, 6, 7], response_ids=[8, 9], behave_logprobs=[-0.5, -1.5],
                    versions=[3, 4], advantage=2.0)
    mb = collate([s], [0], seq_len=7)
    # position i scores token i+1: response token 8 is scored at position 2, token 9 at 3
    assert mb.tokens[0].tolist() == [5, 6, 7, 8, 9, 0, 0]
    assert mb.labels[0, :4].tolist() == [6, 7, 8, 9]
    assert mb.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert mb.behave_logp[0].tolist() == [0, 0, -0.5, -1.5, 0, 0, 0]
    assert mb.versions[0].tolist() == [-1, -1, 3, 4, -1, -1, -1]
    assert torch.equal(mb.advantages[0], torch.tensor([0, 0, 2.0, 2.0, 0, 0, 0]))


def test_sample_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 response tokens but 1 behave_logprobs"):
        TrainSample(prompt_ids=[1], response_ids=[2, 3], behave_logprobs=[0.0], versions=[0, 0], advantage=0.0)


@pytest.mark.parametrize("seed", range(4))
def test_minibatch_plan_gives_every_rank_work_and_every_sample_once(seed):
    from megatron_a3po.trainer.packing import plan_minibatch

    rng = random.Random(seed)
    dp, budget, pad = rng.choice([1, 2, 3, 8]), 128, rng.choice([1, 4])
    lengths = [rng.randint(3, 60) for _ in range(rng.randint(dp, 70))]
    plan = plan_minibatch(lengths, dp, budget, pad_multiple=pad)
    assert len(plan) == dp and all(plan)  # every rank joins the gradient reduction with a micro-batch
    assert sorted(i for mbs in plan for p in mbs for i in p.indices) == list(range(len(lengths)))
    for mbs in plan:
        for p in mbs:
            assert p.seq_len == -(-max(lengths[i] for i in p.indices) // pad) * pad
            assert len(p.indices) * p.seq_len <= budget
    assert plan == plan_minibatch(lengths, dp, budget, pad_multiple=pad)  # every rank computes the same plan
    with pytest.raises(ValueError, match="cannot give each of the 4 data-parallel ranks"):
        plan_minibatch([5, 6, 7], 4, budget)


def test_gsm8k_lengths_pack_to_093_real_tokens_per_padded_token():
    """The 1.5B recipe's shape (DP 8, 10240 tokens per micro-batch) on one batch of GSM8K-length samples
    (bench/packing.py's length model): at least 0.93 of the padded tokens are real."""
    from bench.packing import _batch, gsm8k_lengths

    from megatron_a3po.trainer.packing import plan_minibatch

    groups = _batch(gsm8k_lengths(), random.Random(0), 256, 4, 1024)
    real = padded = 0
    for k in range(4):
        lengths = [L for g in groups[64 * k:64 * (k + 1)] for L in g]
        plan = plan_minibatch(lengths, 8, 10240)
        real += sum(lengths)
        padded += sum(p.padded_tokens for mbs in plan for p in mbs)
    assert real / padded >= 0.93
