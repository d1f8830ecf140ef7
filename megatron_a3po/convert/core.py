"""Moving weights between HF checkpoints and a live Megatron model at any TP/PP.

  load_hf_into_model(chunks, hf_dir, hf_config)      each rank reads only the HF tensors it needs
  export_hf_weights(chunks, hf_config, bucket_bytes)  streaming (hf_name, tensor) buckets, TP shards
                                                      gathered, PP stages broadcast, vocab padding removed
  save_hf_checkpoint(chunks, hf_config, out_dir)      HF safetensors shards + index + config, atomically
  save_mcore_checkpoint / load_mcore_checkpoint       megatron dist_checkpointing (torch_dist), loads at
                                                      another TP/PP; carries the HF config beside it

Memory: loading holds one HF tensor set of one parameter at a time (safetensors reads lazily); the
export holds at most one bucket plus the tensors of the parameter being gathered (``ExportStats``
records the peak, for tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_a3po.models.families import get_family
from megatron_a3po.convert.rules import Vocab, fill, hf_shapes, local_name, shard, unshard
from megatron_a3po.models.builder import arch_from_hf, padded_vocab_size


from megatron_a3po.convert.distckpt import CheckpointError, load_dist_checkpoint
from megatron_a3po.platform.ranks import barrier, global_rank, world_size


# ------------------------------------------------------------------------------------------ HF files
class HFReader:
    """Lazy access to the tensors of an HF checkpoint dir (single file or sharded with an index)."""

    def __init__(self, hf_dir):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        elif single.exists():
            wm = None
        else:
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self._safe_open = safe_open
        self.files: dict[str, object] = {}
        if wm is None:
            f = self._open(single)
            self.weight_map = {k: single.name for k in f.keys()}
        else:
            self.weight_map = wm
            for fname in sorted(set(wm.values())):
                if not (self.dir / fname).exists():
                    raise CheckpointError(f"{self.dir / fname}: shard listed in {index.name} is missing")

    def _open(self, path: Path):
        key = path.name
        if key not in self.files:
            try:
                self.files[key] = self._safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - truncated / corrupt file: safetensors raises several types
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
        return self.files[key]

    def __contains__(self, name):
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name} not found in the checkpoint")
        path = self.dir / self.weight_map[name]
        f = self._open(path)
        try:
            return f.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a damaged tensor: safetensors raises several types
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None


# ------------------------------------------------------------------------------------------ tables
def _chunk_params(chunk):
    """(global layer index or None, local-spec suffix or global name, parameter) of a model chunk."""
    layers = chunk.decoder.layers if hasattr(chunk, "decoder") else []
    for name, p in chunk.named_parameters():
        if name.startswith("decoder.layers."):
            j, suffix = name[len("decoder.layers."):].split(".", 1)
            yield layers[int(j)].layer_number - 1, local_name(suffix), name, p
        else:
            yield None, name, name, p


def _rule_for(family, arch, layer: int | None, key: str, name: str):
    table = family.layer_table(arch) if layer is not None else family.global_table
    if key not in table:
        raise CheckpointError(f"no {family.name} mapping for Megatron parameter {name}")
    return fill(table[key], layer)


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


# ------------------------------------------------------------------------------------------ load
def load_hf_into_model(model_chunks, hf_dir, hf_config) -> None:
    """Copy HF weights into this rank's parameters (every rank calls it; no collectives)."""
    arch = arch_from_hf(hf_config)
    fam = get_family(arch.family)
    reader = HFReader(hf_dir)
    tp_rank, tp = _tp()
    pv = padded_vocab_size(arch.vocab_size, tp)
    for chunk in model_chunks:
        for layer, key, name, p in _chunk_params(chunk):
            rule = _rule_for(fam, arch, layer, key, name)

            def get(n, rule=rule):
                if n not in reader and isinstance(rule, Vocab) and rule.tied_fallback and arch.tie_embeddings:
                    n = rule.tied_fallback
                t = reader.get(n)
                want = (arch.vocab_size, arch.hidden_size) if isinstance(rule, Vocab) else hf_shapes(rule, arch)[n]
                if tuple(t.shape) != tuple(want):
                    raise CheckpointError(f"{reader.dir}: {n} has shape {tuple(t.shape)} but the config "
                                          f"(hidden_size/vocab_size/heads) implies {tuple(want)}")
                return t

            val = shard(rule, get, tp_rank, tp, arch, pv)
            if tuple(val.shape) != tuple(p.shape):
                raise CheckpointError(f"{name}: HF gives {tuple(val.shape)}, model expects {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(val.to(p.dtype))


# ------------------------------------------------------------------------------------------ export
@dataclass
class ExportStats:
    bucket_bytes: int = 0
    peak_bytes: int = 0  # largest (bucket held + tensors being gathered) seen
    buckets: int = 0
    tensors: int = 0


def _global_param_order(model_chunks, arch, fam):
    """The export order, the same on every rank: (layer or None, key) for the whole model."""
    order = [(None, "embedding.word_embeddings.weight")]
    for i in range(arch.num_layers):
        order += [(i, k) for k in fam.layer_table(arch)]
    order.append((None, "decoder.final_layernorm.weight"))
    if not arch.tie_embeddings:
        order.append((None, "output_layer.weight"))
    return order


def _stage_of(model_chunks, arch, pp: int):
    """(layer or None, key) -> the pipeline stage holding it, from megatron's own layer split (the same
    on every rank, no collective): layers by stage offset; embedding on the first stage, final norm and
    output layer on the last."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    cfg = model_chunks[0].config
    stage_of_layer = {}
    for r in range(pp):
        off = get_transformer_layer_offset(cfg, pp_rank=r)
        for i in range(off, off + get_num_layers_to_build(cfg, pp_rank=r)):
            stage_of_layer[i] = r

    def stage(layer, key):
        if layer is not None:
            return stage_of_layer[layer]
        return 0 if key.startswith("embedding.") else pp - 1

    return stage


def _export_placement(model_chunks, arch, dst: int):
    """For a multi-rank export: is this rank in ``dst``'s data-parallel replica (its pipeline group holds
    ``dst``, its TP groups gather), the pipeline-group index of ``dst``'s stage (on the replica's TP rank
    0; None elsewhere), and the stage owning each parameter."""
    from megatron.core import parallel_state as ps

    tp_rank, _ = _tp()
    in_replica = ps.get_data_parallel_rank() == 0
    if global_rank() == dst and (tp_rank != 0 or not in_replica):
        raise ValueError(f"export_hf_weights: dst={dst} must be TP rank 0 of data-parallel replica 0")
    dst_stage = None
    if in_replica and tp_rank == 0:
        pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        dst_stage = pp_ranks.index(dst) if dst in pp_ranks else None
    return in_replica, dst_stage, _stage_of(model_chunks, arch, ps.get_pipeline_model_parallel_world_size())


def export_hf_weights(model_chunks, hf_config, bucket_bytes: int = 512 << 20, *,
                      stats: ExportStats | None = None, dtype: torch.dtype | None = None, dst: int = 0
                      ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of full HF tensors on global rank ``dst`` (0, or the only rank); the other ranks
    iterate it too, in step, and get no buckets. Collective.

    Per parameter, only the ranks that hold it take part: the owner stage's TP ranks of ``dst``'s
    data-parallel replica gather its shards to their TP rank 0 (a gather, not an all-gather), which
    converts them to HF tensors and, on a stage other than ``dst``'s, sends them to ``dst`` over the
    pipeline group. Other replicas do nothing; no stage receives tensors it does not need.
    Requires ``dst`` to be TP rank 0 and data-parallel rank 0 (global rank 0 is).
    """
    from megatron.core import parallel_state as ps

    from megatron_a3po.platform import comm_device

    arch = arch_from_hf(hf_config)
    fam = get_family(arch.family)
    tp_rank, tp = _tp()
    world = world_size()
    me = global_rank()
    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    stage = ps.get_pipeline_model_parallel_rank()
    mine = {}
    for chunk in model_chunks:
        for layer, key, name, p in _chunk_params(chunk):
            if key == "output_layer.weight" and arch.tie_embeddings:
                continue
            mine[(layer, key)] = p
    st = stats if stats is not None else ExportStats()
    st.bucket_bytes = bucket_bytes
    in_replica, dst_stage, stage_of = _export_placement(model_chunks, arch, dst) if world > 1 else (
        True, 0, lambda layer, key: 0)
    bucket: list[tuple[str, torch.Tensor]] = []
    held = 0
    for layer, key in _global_param_order(model_chunks, arch, fam):
        owner = stage_of(layer, key)
        if not in_replica or owner != stage and me != dst:
            continue  # nothing of this parameter here, nothing for this rank to receive
        rule = _rule_for(fam, arch, layer, key, key)
        shapes = hf_shapes(rule, arch)
        full = None
        if owner == stage:
            if (layer, key) not in mine:
                raise CheckpointError(f"pipeline stage {stage} should hold {key} (layer {layer}) but does not")
            p = mine[(layer, key)].detach()
            if tp > 1:
                parts = [torch.empty_like(p) for _ in range(tp)] if tp_rank == 0 else None
                dist.gather(p.contiguous(), parts, group_dst=0, group=tp_group)
            else:
                parts = [p]
            if tp_rank == 0:
                full = unshard(rule, parts, arch)
                full = {n: t.to(dtype) if dtype is not None else t for n, t in full.items()}
            if tp_rank != 0 or me == dst:
                pass
            elif dst_stage is not None:  # the replica's TP rank 0 of a stage other than dst's: send
                for n in shapes:
                    dist.send(full[n].contiguous(), group_dst=dst_stage, group=pp_group)
                full = None
            else:
                full = None
        if me == dst and full is None:  # from the owner stage's TP rank 0, over the pipeline group
            pdtype = dtype or next(t for t in mine.values()).dtype
            full = {n: torch.empty(s, dtype=pdtype, device=comm_device()) for n, s in shapes.items()}
            for n in shapes:
                dist.recv(full[n], group_src=owner, group=pp_group)
        if me != dst:
            continue
        nbytes = sum(t.numel() * t.element_size() for t in full.values())
        st.peak_bytes = max(st.peak_bytes, held + nbytes)
        if bucket and held + nbytes > bucket_bytes:
            st.buckets += 1
            yield bucket
            bucket, held = [], 0
        for n in shapes:  # HF order within a parameter
            bucket.append((n, full[n].contiguous()))
            st.tensors += 1
        held += nbytes
        del full
    if bucket:
        st.buckets += 1
        yield bucket


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_hf_checkpoint(model_chunks, hf_config, out_dir, *, tokenizer_dir=None, bucket_bytes: int = 512 << 20,
                       max_shard_bytes: int = 2 << 30, dtype: torch.dtype | None = None,
                       overwrite: bool = True, progress=None, fsync: bool = True) -> Path | None:
    """Write an HF checkpoint (collective). Rank 0 writes into a temp dir, renamed at the end.

    ``fsync=False`` skips flushing the shards to disk: for the per-step weight-sync dirs the engines
    read straight away (from the page cache) and that are deleted two steps later."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    rank0 = global_rank() == 0
    tmp = None
    if rank0:
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise CheckpointError(f"{out} exists and is not empty (pass --overwrite)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    try:
        cur: dict[str, torch.Tensor] = {}
        cur_bytes = 0
        weight_map: dict[str, int] = {}
        n_written = 0

        def flush():
            nonlocal cur, cur_bytes, n_written
            if cur:
                path = tmp / f"part-{n_written:05d}.safetensors"
                save_file(cur, str(path), metadata={"format": "pt"})
                if fsync:
                    _fsync(path)  # durable before the directory is renamed into place
                for k in cur:
                    weight_map[k] = n_written
                n_written += 1
                cur, cur_bytes = {}, 0

        for b in export_hf_weights(model_chunks, hf_config, bucket_bytes, dtype=dtype):
            if not rank0:
                continue
            for n, t in b:
                nb = t.numel() * t.element_size()
                if cur and cur_bytes + nb > max_shard_bytes:
                    flush()
                cur[n] = t
                cur_bytes += nb
            if progress is not None:
                progress(len(b))
        if rank0:
            flush()
            total = n_written
            names = {}
            for i in range(total):
                final = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                os.replace(tmp / f"part-{i:05d}.safetensors", tmp / final)
                names[i] = final
            if total > 1:
                size = sum((tmp / n).stat().st_size for n in names.values())
                idx = {"metadata": {"total_size": size}, "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
            cfg = hf_config.__class__.from_dict(hf_config.to_dict())
            if dtype is not None:
                cfg.torch_dtype = dtype
            cfg.save_pretrained(tmp)
            if tokenizer_dir is not None:
                for f in Path(tokenizer_dir).iterdir():
                    if f.is_file() and (f.name.startswith("tokenizer") or f.name in (
                            "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
                            "generation_config.json")):
                        shutil.copy2(f, tmp / f.name)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
            tmp = None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return out if rank0 else None


# ------------------------------------------------------------------------------------------ mcore
def save_mcore_checkpoint(model_chunks, ckpt_dir, *, hf_config=None) -> None:
    """Megatron dist checkpoint of the model (collective), plus hf_config/ for the architecture."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if global_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if hf_config is not None:
            hf_config.save_pretrained(ckpt_dir / "hf_config")
    barrier()
    sd = {}
    for i, m in enumerate(model_chunks):
        sd.update(m.sharded_state_dict(prefix=f"model{i}." if len(model_chunks) > 1 else ""))
    with _in_process_results_queue():
        dist_checkpointing.save(sd, str(ckpt_dir), async_sharded_save=False)


@contextlib.contextmanager
def _in_process_results_queue():
    """A synchronous save hands megatron's torch_dist writer a plain in-process queue for its results.

    megatron creates that queue lazily as a *spawn*-context ``Manager().Queue()`` so results can cross
    into an asynchronous checkpoint process; starting the manager spawns a Python that re-imports the
    main module (torch, megatron): seconds per process, for nothing when the save is synchronous (the
    writer's forked workers report through their own queue; only this process reads the result).
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        yield
        return
    if getattr(fa, "_results_queue", "absent") is not None:  # already made, or a version without it
        yield
        return
    import queue

    fa._results_queue = queue.Queue()
    try:
        yield
    finally:
        fa._results_queue = None


def load_mcore_checkpoint(model_chunks, ckpt_dir) -> None:
    """Load a dist checkpoint into the chunks (verified first, tensors only: see convert.distckpt)."""
    ckpt_dir = Path(ckpt_dir)
    for i, m in enumerate(model_chunks):
        prefix = f"model{i}." if len(model_chunks) > 1 else ""
        sd = m.sharded_state_dict(prefix=prefix)
        loaded = load_dist_checkpoint(sd, ckpt_dir)
        if prefix:
            loaded = {k[len(prefix):]: v for k, v in loaded.items()}
        missing, unexpected = m.load_state_dict(loaded, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"{ckpt_dir}: missing tensors {missing[:5]}")
