import hashlib

import torch

from megatron_a3po.convert.digest import state_digest


def test_digest_is_order_independent_and_sensitive():
    a = [("x", torch.arange(6, dtype=torch.float32).view(2, 3)), ("y", torch.ones(2, dtype=torch.bfloat16))]
    d = state_digest(a)
    assert d == state_digest(list(reversed(a)))
    assert d != state_digest([("x", a[0][1].view(3, 2)), a[1]])  # shape matters
    assert d != state_digest([("x", a[0][1].double()), a[1]])  # dtype matters
    b = a[0][1].clone()
    b[0, 0] = 1e-30
    assert d != state_digest([("x", b), a[1]])  # bytes matter
    assert d != state_digest([("z", a[0][1]), a[1]])  # names matter
    assert len(d) == len(hashlib.sha256().hexdigest())
