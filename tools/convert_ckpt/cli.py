"""Convert checkpoints between HF safetensors and Megatron torch_dist, at any TP/PP.

    python -m tools.convert_ckpt hf-to-mcore --hf DIR --out DIR --tp N --pp N [--overwrite]
    python -m tools.convert_ckpt mcore-to-hf --mcore DIR --out DIR [--hf-config DIR] [--tokenizer DIR]
                                             [--tp N --pp N] [--overwrite]

The tool starts the TP x PP ranks it needs itself (gloo on CPU, NCCL on GPU): never wrap it in torchrun.
Inputs are checked before any process starts (architecture, layout, every tensor the config implies,
with its shape, in a readable shard); output is written to a temp dir beside --out and renamed at the
end, so an error leaves nothing behind. Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from megatron_a3po.errors import A3POError


class CliError(A3POError):
    pass


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=True)


def _hf_to_mcore_rank(rank, world, hf_dir, tmp_out, tp, pp):
    from transformers import AutoConfig

    from megatron_a3po.convert import load_hf_into_model, save_mcore_checkpoint
    from megatron_a3po.models import build_model, weights_dtype
    from megatron_a3po.platform import init_distributed

    init_distributed(tp=tp, pp=pp)
    cfg = AutoConfig.from_pretrained(hf_dir)
    model = build_model(cfg, params_dtype=weights_dtype(cfg), init_weights=False)  # HF dtype: no up-cast
    t0 = time.perf_counter()
    load_hf_into_model([model], hf_dir, cfg)
    t1 = time.perf_counter()
    save_mcore_checkpoint([model], tmp_out, hf_config=cfg)
    return {"read_s": t1 - t0, "write_s": time.perf_counter() - t1}


def _mcore_to_hf_rank(rank, world, mcore_dir, cfg_dir, out, tokenizer_dir, tp, pp, n_tensors):
    from transformers import AutoConfig

    from megatron_a3po.convert import load_mcore_checkpoint, save_hf_checkpoint
    from megatron_a3po.models import build_model, weights_dtype
    from megatron_a3po.platform import init_distributed

    init_distributed(tp=tp, pp=pp)
    cfg = AutoConfig.from_pretrained(cfg_dir)
    model = build_model(cfg, params_dtype=weights_dtype(cfg), init_weights=False)
    t0 = time.perf_counter()
    load_mcore_checkpoint([model], mcore_dir)
    t1 = time.perf_counter()
    bar = _progress(n_tensors, "mcore-to-hf") if rank == 0 else None
    save_hf_checkpoint([model], cfg, out, tokenizer_dir=tokenizer_dir, progress=bar.update if bar else None)
    if bar:
        bar.close()
    return {"read_s": t1 - t0, "write_s": time.perf_counter() - t1}


def _check_out(out: Path, overwrite: bool):
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CliError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")


def _check_apart(out: Path, **sources):
    """--out must not be, lie inside, or contain a source directory (--overwrite would delete it)."""
    o = out.resolve()
    for flag, src in sources.items():
        if src is None:
            continue
        s = Path(src).resolve()
        if o == s:
            raise CliError(f"--out {out} is the --{flag.replace('_', '-')} directory itself")
        if s in o.parents:
            raise CliError(f"--out {out} lies inside --{flag.replace('_', '-')} {src}")
        if o in s.parents:
            raise CliError(f"--out {out} contains --{flag.replace('_', '-')} {src}")


def _arch_and_layout(cfg, tp: int, pp: int, where: str):
    from megatron_a3po.models import arch_from_hf, check_layout

    arch = arch_from_hf(cfg)  # UnsupportedModel names the architecture and lists the supported ones
    try:
        check_layout(arch, tp=tp, pp=pp, keys={"tp": "--tp", "pp": "--pp"})
    except ValueError as e:
        raise CliError(f"{where}: {e}") from None
    return arch


def expected_hf_tensors(arch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies, with its shape (from the family's declarative table)."""
    from megatron_a3po.models.families import get_family
    from megatron_a3po.convert.rules import fill, hf_shapes

    fam = get_family(arch.family)
    out = {}
    for key, rule in fam.global_table.items():
        if key == "output_layer.weight" and arch.tie_embeddings:
            continue
        out.update(hf_shapes(rule, arch))
    for i in range(arch.num_layers):
        for rule in fam.layer_table(arch).values():
            out.update(hf_shapes(fill(rule, i), arch))
    return out


def validate_hf_dir(hf: Path, tp: int, pp: int):
    from transformers import AutoConfig

    from megatron_a3po.convert import CheckpointError, HFReader

    if not (hf / "config.json").exists():
        raise CliError(f"{hf / 'config.json'} not found (--hf must be an HF model directory)")
    cfg = AutoConfig.from_pretrained(hf)
    arch = _arch_and_layout(cfg, tp, pp, str(hf / "config.json"))
    reader = HFReader(hf)  # missing index entries / shards raise CheckpointError naming the file
    for name, shape in expected_hf_tensors(arch).items():
        if name not in reader:
            raise CliError(f"tensor {name} is missing from the checkpoint in {hf}")
        f = reader._open(hf / reader.weight_map[name])
        try:
            got = tuple(f.get_slice(name).get_shape())
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{hf / reader.weight_map[name]}: cannot read tensor {name} ({e})") from None
        if got != tuple(shape):
            raise CliError(f"tensor {name} in {hf / reader.weight_map[name]} has shape {list(got)} but config.json "
                           f"implies {list(shape)} (vocab_size={arch.vocab_size}, hidden_size={arch.hidden_size})")
    for fname in sorted(set(reader.weight_map.values())):  # a truncated shard: its bytes end early
        p = hf / fname
        header = p.open("rb").read(8)
        n = int.from_bytes(header, "little") if len(header) == 8 else -1
        meta = json.loads(p.open("rb").read(8 + n)[8:]) if n > 0 else {}
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if n < 0 or p.stat().st_size < 8 + n + end:
            raise CliError(f"{p} is truncated ({p.stat().st_size} bytes, its header says {8 + n + end})")
    return cfg, arch


def _run(fn, world: int, out: Path, *args):
    from megatron_a3po.platform.procs import WorkerError, run_distributed

    try:
        return run_distributed(fn, world, *args, timeout=24 * 3600)[0]
    except WorkerError as e:
        lines = [l for l in str(e).strip().splitlines() if l.strip()]
        raise CliError(f"conversion failed: {lines[-1] if lines else e}") from None


def hf_to_mcore(args):
    hf, out = Path(args.hf), Path(args.out)
    if not hf.is_dir():
        raise CliError(f"--hf {hf} is not a directory")
    _check_apart(out, hf=hf)
    _check_out(out, args.overwrite)
    cfg, arch = validate_hf_dir(hf, args.tp, args.pp)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-convert"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        t = _run(_hf_to_mcore_rank, args.tp * args.pp, out, str(hf), str(tmp), args.tp, args.pp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote Megatron checkpoint {out} (tp={args.tp}, pp={args.pp}, {arch.family}; "
          f"read {t['read_s']:.2f}s, write {t['write_s']:.2f}s)")
    return t


def mcore_to_hf(args):
    from transformers import AutoConfig

    mc, out = Path(args.mcore), Path(args.out)
    _check_apart(out, mcore=mc, hf_config=args.hf_config, tokenizer=args.tokenizer)
    if not (mc / "metadata.json").exists():
        raise CliError(f"--mcore {mc}: not a Megatron dist checkpoint (no metadata.json)")
    cfg_dir = Path(args.hf_config) if args.hf_config else mc / "hf_config"
    if not (cfg_dir / "config.json").exists():
        raise CliError(f"{cfg_dir / 'config.json'} not found (pass --hf-config DIR)")
    cfg = AutoConfig.from_pretrained(cfg_dir)
    arch = _arch_and_layout(cfg, args.tp, args.pp, str(cfg_dir / "config.json"))
    stored = mc / "hf_config" / "config.json"
    if args.hf_config and stored.exists():
        from megatron_a3po.models import arch_from_hf

        saved = arch_from_hf(AutoConfig.from_pretrained(mc / "hf_config"))
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(saved, f) != getattr(arch, f):
                raise CliError(f"--hf-config {cfg_dir}: {f}={getattr(arch, f)} but the checkpoint was saved with "
                               f"{f}={getattr(saved, f)}")
    _check_out(out, args.overwrite)
    n = len(expected_hf_tensors(arch))
    t = _run(_mcore_to_hf_rank, args.tp * args.pp, out, str(mc), str(cfg_dir), str(out),
             args.tokenizer or (args.hf_config if args.hf_config else None), args.tp, args.pp, n)
    print(f"wrote HF checkpoint {out} (read {t['read_s']:.2f}s, write {t['write_s']:.2f}s)")
    return t


def build_parser():
    p = argparse.ArgumentParser(prog="python -m tools.convert_ckpt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron torch_dist checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    a.add_argument("--tp", type=int, default=1, help="tensor parallel size to convert at (default 1)")
    a.add_argument("--pp", type=int, default=1, help="pipeline parallel size to convert at (default 1)")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    b = sub.add_parser("mcore-to-hf", help="Megatron torch_dist checkpoint -> HF safetensors")
    b.add_argument("--mcore", required=True, help="Megatron checkpoint directory")
    b.add_argument("--out", required=True, help="output HF model directory")
    b.add_argument("--hf-config", default=None, help="HF dir to take config.json (and tokenizer) from "
                   "(default: the config stored in the checkpoint)")
    b.add_argument("--tokenizer", default=None, help="directory with tokenizer files to copy")
    b.add_argument("--tp", type=int, default=1, help="tensor parallel size to load at (default 1)")
    b.add_argument("--pp", type=int, default=1, help="pipeline parallel size to load at (default 1)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        (hf_to_mcore if args.cmd == "hf-to-mcore" else mcore_to_hf)(args)
    except A3POError as e:  # CliError, CheckpointError, UnsupportedModel, ...
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0

