"""Command line of the simulated cluster. ``main`` re-executes itself in a child whose first act is
loading the simulated CUDA device (it must precede ``import torch``); the child writes a JSON report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _parser():
    ap = argparse.ArgumentParser(prog="python -m tools.simcluster", description=__doc__)
    ap.add_argument("--recipe", required=True, action="append", help="recipe name or path (repeatable)")
    ap.add_argument("--ranks", default=None, help="comma-separated global ranks (default: last stage, a TP "
                                                   "rank > 0, rank 0)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the recipe's "
                                                                "prompt + max_new_tokens, the worst case)")
    ap.add_argument("--n-mb", type=int, default=None, help="micro-batches per DP rank (default: PP, the most stage 0 holds)")
    ap.add_argument("--phases", default="spawn,step,export,checkpoint")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--set", action="append", default=[], help="recipe override key=value (repeatable)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not args.child:
        from megatron_a3po.platform.sim import build_sim_cuda

        lib = build_sim_cuda()
        code = ("import ctypes, os, sys; ctypes.CDLL(os.environ['A3PO_SIM_CUDA_LIB'], mode=ctypes.RTLD_GLOBAL); "
                "from tools.simcluster.cli import main; sys.exit(main(sys.argv[1:]))")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                  "MASTER_PORT", "LOCAL_WORLD_SIZE")}
        env.setdefault("OMP_NUM_THREADS", "1")
        env["A3PO_SIM_CUDA_LIB"] = str(lib)
        cmd = [sys.executable, "-c", code, "--child", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode
    return _child(args)


def _child(args) -> int:
    from megatron_a3po.config import load_recipe
    from tools.simcluster.sim import default_ranks, hf_config_for, layout_of, simulate_rank

    report = []
    for name in args.recipe:
        recipe = load_recipe(name, args.set)
        hf = hf_config_for(recipe)
        spec = layout_of(recipe)
        ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else default_ranks(spec)
        seq = args.seq_len or min(recipe.trainer.max_tokens_per_mb, 160 + recipe.rollout.max_new_tokens + 1)
        n_mb = args.n_mb or (spec.pp if spec.pp > 1 else 1)  # stage 0 holds PP micro-batches in 1F1B
        for r in ranks:
            s = dataclasses.replace(spec, rank=r)
            res = simulate_rank(recipe, hf, s, seq_len=seq, n_mb=n_mb, measure_memory=not args.no_memory,
                                phases=tuple(args.phases.split(",")))
            d = dataclasses.asdict(res)
            d["recipe"] = recipe.name
            d["layout"] = {"tp": spec.tp, "pp": spec.pp, "dp": spec.dp, "world": spec.world,
                           "sp": recipe.parallel.sequence_parallel}
            report.append(d)
            bad = [f"{k}: {v['error'].splitlines()[0]}" for k, v in d["phases"].items() if not v["ok"]]
            print(f"[simcluster] {recipe.name} rank {r} {d['coords']}: "
                  + ("ok" if not bad else "FAILED " + " | ".join(bad)), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0
