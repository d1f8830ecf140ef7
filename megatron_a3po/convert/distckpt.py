"""Reading a megatron dist_checkpointing (torch_dist) directory without trusting it.

A torch_dist directory holds ``metadata.json`` (JSON), ``.metadata`` (a *pickle* that torch's
FileSystemReader loads with a bare ``pickle.load``), ``common.pt`` (``torch.load``, weights only) and
``__R_I.distcp`` storage files. Byte items inside the storage files (``ShardedObject``, e.g. the
layers' ``_extra_state``) are unpickled by torch's default load planner with no weights-only restriction.

``verify_dist_checkpoint(path)`` runs before any load and raises ``CheckpointError`` naming the file:
  * ``.metadata`` is read with an unpickler that only builds the checkpoint-metadata classes of
    torch.distributed.checkpoint (a crafted pickle naming anything else is refused, nothing runs);
  * ``common.pt`` must load with ``weights_only=True``;
  * every storage file the metadata names exists and is long enough for every item in it (a
    truncated or missing shard is an error, never a partial load).
``load_dist_checkpoint(sharded_sd, path)`` then loads only tensors: ``ShardedObject`` entries are
left out of the request, so no byte item of the checkpoint is ever unpickled.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from megatron_a3po.errors import A3POError


class CheckpointError(A3POError, ValueError):
    pass


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        import importlib

        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _DCP_MODULES and not name.startswith("__"):
            obj = getattr(importlib.import_module(module), name, None)
            # classes (dataclasses, enums) and the enum-encoding constant; no functions
            if isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING":
                return obj
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_dcp_metadata(path: Path):
    """The ``.metadata`` pickle of a torch_dist directory, read with the restricted unpickler."""
    f = Path(path) / ".metadata"
    if not f.exists():
        raise CheckpointError(f"{f}: missing (not a complete torch_dist checkpoint)")
    try:
        with open(f, "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: not a valid checkpoint metadata file ({type(e).__name__}: {e})") from None


def verify_dist_checkpoint(path) -> None:
    path = Path(path)
    mj = path / "metadata.json"
    if not mj.exists():
        raise CheckpointError(f"{path}: not a Megatron dist checkpoint (no metadata.json)")
    try:
        json.loads(mj.read_text())
    except ValueError as e:
        raise CheckpointError(f"{mj}: not valid JSON ({e})") from None
    meta = read_dcp_metadata(path)
    need: dict[str, int] = {}
    for info in getattr(meta, "storage_data", {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        f = path / rel
        if not f.exists():
            raise CheckpointError(f"{f}: shard missing (named by {path}/.metadata)")
        have = f.stat().st_size
        if have < size:
            raise CheckpointError(f"{f}: shard truncated ({have} bytes, the metadata needs {size})")
    common = path / "common.pt"
    if common.exists():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is a damaged or foreign file
            raise CheckpointError(f"{common}: cannot be read as plain tensors/containers "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def tensors_only(sharded_sd: dict) -> dict:
    """The request without ``ShardedObject`` entries (their bytes would be unpickled)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items() if not isinstance(v, ShardedObject)}
        if isinstance(x, list):
            return [walk(v) for v in x if not isinstance(v, ShardedObject)]
        return x

    return walk(sharded_sd)


def load_dist_checkpoint(sharded_sd: dict, path) -> dict:
    """``dist_checkpointing.load`` of the tensors of ``sharded_sd`` from a verified directory."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    verify_dist_checkpoint(path)
    try:
        return dist_checkpointing.load(tensors_only(sharded_sd), str(path))
    except Exception as e:
        msg = str(e).splitlines()[0][:400] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: does not match this model ({type(e).__name__}: {msg})") from e


__all__ = ["CheckpointError", "verify_dist_checkpoint", "load_dist_checkpoint", "read_dcp_metadata", "tensors_only"]
