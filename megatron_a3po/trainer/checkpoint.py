"""Checkpoint and resume: model and optimizer through megatron's dist_checkpointing, plus a state file.

Layout of ``save_dir``:
  step_000010/            one checkpoint, complete or absent (written as .tmp-step_000010 then renamed)
    model/                the model's sharded state dict (torch_dist)
    optim/                the optimizer's sharded state dict (torch_dist): fp32 main weights, Adam
                          moments and step in the distributed optimizer's ``fully_reshardable`` format,
                          so the checkpoint resumes at another TP / PP / DP layout
    state.json            step, policy version, rollout data cursor, RNG states, the model's
                          architecture and the layout it was saved at (rank 0)
  latest                  the name of the newest complete checkpoint (written atomically)

Nothing here unpickles a checkpoint file: see megatron_a3po.convert.distckpt (the torch_dist metadata
is read with an allow-list unpickler, only tensors are requested, ``common.pt`` loads weights-only).
Every problem (missing or truncated shard, a crafted pickle, a checkpoint of another model) is a
``CheckpointError`` that names the file and the checkpoint.

After the optimizer state is loaded, the model weights are those of model/ and the fp32 main weights
those of optim/ (the same values, the model's cast to its dtype): ``reload_model_params()`` is not
called, since it would overwrite the restored fp32 main weights with the bf16 model weights.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from megatron_a3po.convert.distckpt import CheckpointError, load_dist_checkpoint, verify_dist_checkpoint
from megatron_a3po.io import atomic_write_text
from megatron_a3po.platform.ranks import barrier, global_rank

# the fields of the HF config that fix every tensor's shape: a checkpoint must match them all
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))


def model_arch(hf_config) -> dict:
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    d.setdefault("num_key_value_heads", d.get("num_attention_heads"))
    return {k: d.get(k) for k in ARCH_FIELDS}


def layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _model_sharded_state_dict(actor) -> dict:
    chunks = actor._bare_chunks()
    sd = {}
    for i, m in enumerate(chunks):
        sd.update(m.sharded_state_dict(prefix=f"model{i}." if len(chunks) > 1 else ""))
    return sd


def save_checkpoint(save_dir, step: int, actor, state: dict) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    from megatron.core import dist_checkpointing

    from megatron_a3po.convert import save_mcore_checkpoint
    from megatron_a3po.convert.core import _in_process_results_queue

    save_dir = Path(save_dir)
    name = f"step_{step:06d}"
    final = save_dir / name
    tmp = save_dir / f".tmp-{name}"
    if global_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "optim").mkdir(parents=True)
    barrier()
    save_mcore_checkpoint(actor._bare_chunks(), str(tmp / "model"))
    osd = actor.optim.sharded_state_dict(_model_sharded_state_dict(actor))
    with _in_process_results_queue():
        dist_checkpointing.save(osd, str(tmp / "optim"), async_sharded_save=False)
    state = dict(state, model=model_arch(actor.hf_config), layout=layout())
    barrier()
    if global_rank() == 0:
        atomic_write_text(tmp / "state.json", json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(save_dir / "latest", name)
    barrier()
    return final


def latest_checkpoint(save_dir) -> Path | None:
    p = Path(save_dir) / "latest"
    if not p.exists():
        return None
    d = Path(save_dir) / p.read_text().strip()
    if not (d / "state.json").exists():
        raise CheckpointError(f"{p} names {d.name}, but {d}/state.json is missing: checkpoint incomplete")
    return d


def read_state(ckpt: Path) -> dict:
    f = Path(ckpt) / "state.json"
    try:
        st = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    missing = [k for k in ("step", "version", "rng", "rollout") if k not in st]
    if missing:
        raise CheckpointError(f"{f}: missing {missing}")
    return st


def verify_checkpoint(ckpt, arch: dict | None = None) -> dict:
    """Static checks of a checkpoint (no distributed state needed); returns its state.json.

    ``arch``: fields of the model about to be trained (any subset of ARCH_FIELDS); each one the
    checkpoint records must match."""
    ckpt = Path(ckpt)
    st = read_state(ckpt)
    saved = st.get("model") or {}
    if arch:
        diff = {k: (saved[k], arch[k]) for k in ARCH_FIELDS
                if k in arch and saved.get(k) is not None and arch[k] is not None and saved[k] != arch[k]}
        if diff:
            what = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"{ckpt}/state.json: checkpoint of a different model ({what})")
    for sub in ("model", "optim"):
        try:
            verify_dist_checkpoint(ckpt / sub)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {ckpt}: {e}") from None
    return st


def load_checkpoint(ckpt: Path, actor) -> dict:
    """Collective: restore model and optimizer (at any layout) and return the state file."""
    from megatron_a3po.convert import load_mcore_checkpoint

    ckpt = Path(ckpt)
    st = verify_checkpoint(ckpt, model_arch(actor.hf_config))
    try:
        load_mcore_checkpoint(actor._bare_chunks(), str(ckpt / "model"))
        osd = actor.optim.sharded_state_dict(_model_sharded_state_dict(actor), is_loading=True)
        actor.optim.load_state_dict(load_dist_checkpoint(osd, ckpt / "optim"))
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {ckpt}: {e}") from None
    return st
