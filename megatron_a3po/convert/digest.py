"""An order-independent digest of named tensors, to check that two holders of a model agree.

The trainer digests what its streaming export yields; an engine digests its loaded weights under the
same HF names. Equal digests mean equal names, dtypes, shapes and bytes.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def tensor_digest(name: str, t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256()
    h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def state_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    parts = sorted(tensor_digest(n, t) for n, t in named)
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()
