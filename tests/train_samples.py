"""Random ``TrainSample`` batches for the trainer tests (behaviour log-probs, versions, advantages drawn
from one seeded generator)."""

import torch


def random_samples(n_groups: int, n: int, seed: int, lengths):
    """``n_groups`` groups of ``n`` samples; ``lengths(k) -> (prompt_len, response_len)`` for sample k."""
    from megatron_a3po.trainer.batch import TrainSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_groups * n):
        P, R = lengths(k)
        out.append(TrainSample(prompt_ids=torch.randint(3, 90, (P,), generator=g).tolist(),
                               response_ids=torch.randint(3, 90, (R,), generator=g).tolist(),
                               behave_logprobs=(-torch.rand(R, generator=g) * 3 - 1).tolist(),
                               versions=torch.randint(3, 6, (R,), generator=g).tolist(),
                               advantage=float(torch.randn((), generator=g)), group_id=k // n))
    return out
