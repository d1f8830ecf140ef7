"""Checkpoint and resume: model (Megatron dist checkpoint), optimizer, and a small state file.

Layout of ``save_dir``:
  step_000010/            one checkpoint, complete or absent (written as .tmp-step_000010 then renamed)
    model/                megatron.core.dist_checkpointing (torch_dist): loads at the same or another TP/PP
    optim/rank_00000.pt   this rank's optimizer state (resume needs the same layout as the save)
    state.json            step, policy version, rollout data cursor, RNG states (rank 0)
  latest                  the name of the newest complete checkpoint (written atomically)
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_a3po.io import atomic_write_text


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast_str(s: str | None) -> str | None:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return s
    obj = [s]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))


def save_checkpoint(save_dir, step: int, actor, state: dict) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    from megatron_a3po.convert import save_mcore_checkpoint

    save_dir = Path(save_dir)
    name = f"step_{step:06d}"
    final = save_dir / name
    tmp = save_dir / f".tmp-{name}"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "optim").mkdir(parents=True)
    _barrier()
    save_mcore_checkpoint(actor._bare_chunks(), str(tmp / "model"))
    torch.save(actor.optim.state_dict(), tmp / "optim" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        atomic_write_text(tmp / "state.json", json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(save_dir / "latest", name)
    _barrier()
    return final


def latest_checkpoint(save_dir) -> Path | None:
    p = Path(save_dir) / "latest"
    if not p.exists():
        return None
    d = Path(save_dir) / p.read_text().strip()
    if not (d / "state.json").exists():
        raise FileNotFoundError(f"{p} names {d.name}, but {d}/state.json is missing: checkpoint incomplete")
    return d


def load_checkpoint(ckpt: Path, actor) -> dict:
    from megatron_a3po.convert import load_mcore_checkpoint

    load_mcore_checkpoint(actor._bare_chunks(), str(ckpt / "model"))
    opt_path = ckpt / "optim" / f"rank_{_rank():05d}.pt"
    if not opt_path.exists():
        raise FileNotFoundError(f"{opt_path} missing: resume needs the same parallel layout as the save")
    actor.optim.load_state_dict(torch.load(opt_path, weights_only=False))
    return json.loads((ckpt / "state.json").read_text())
